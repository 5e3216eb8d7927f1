"""Compiled deployments: AOTInductor package (.pt2), ExecuTorch/XNNPACK (.pte), and files
that replace an earlier export only once their check passed."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import cdnv2.deploy.export as export_mod
from cdnv2.checkpoint import save_compact
from cdnv2.data import DataConfig, build_data
from cdnv2.deploy import ExportError, export_and_check, require
from helpers import cli, condensed_tiny

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def compact():
    return condensed_tiny()


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_check_leaves_the_previous_file_intact(compact, tmp_path, monkeypatch):
    """A rewrite whose check fails (or whose export raises) keeps the earlier good file and sidecar."""
    pytest.importorskip("onnxruntime")
    checks = export_and_check(compact, ["torchscript", "onnx"], tmp_path / "m", SIZE, class_names=["a"])
    assert all(c.ok for c in checks)
    before = _snapshot(tmp_path)
    assert set(before) == {"m.torchscript.pt", "m.onnx", "m.onnx.json"}

    other = condensed_tiny(seed=1)
    monkeypatch.setattr(export_mod, "_tolerance", lambda scale: -1.0)  # every check fails
    checks = export_and_check(other, ["torchscript", "onnx"], tmp_path / "m", SIZE, class_names=["b"])
    assert [c.ok for c in checks] == [False, False]
    assert [c.path for c in checks] == [str(tmp_path / "m.torchscript.pt"), str(tmp_path / "m.onnx")]
    assert _snapshot(tmp_path) == before  # same names, same bytes, no temporary files left

    monkeypatch.undo()
    monkeypatch.setattr(export_mod, "check_onnx", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        export_and_check(other, ["onnx"], tmp_path / "m", SIZE)
    assert _snapshot(tmp_path) == before

    monkeypatch.undo()
    (c,) = export_and_check(other, ["onnx"], tmp_path / "m", SIZE, class_names=["b"])
    assert c.ok and (tmp_path / "m.onnx").read_bytes() != before["m.onnx"]
    assert json.loads((tmp_path / "m.onnx.json").read_text())["class_names"] == ["b"]


def test_export_module_packages_the_static_forward_for_aoti_and_the_graph_for_xnnpack(compact):
    """AOTInductor gets a copy of the compact model (its static forward, faster compiled);
    ExecuTorch the deployment graph (plain convs that XNNPACK delegates)."""
    from cdnv2.compact import CompactDenseLayer
    from cdnv2.deploy.program import export_module

    aoti = export_module(compact, SIZE, "aoti")
    assert type(aoti) is type(compact) and aoti is not compact and not aoti.training
    assert all(m.static_ready for m in aoti.modules() if isinstance(m, CompactDenseLayer))
    xnn = export_module(compact, SIZE, "executorch")
    assert not any(isinstance(m, CompactDenseLayer) for m in xnn.modules())
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = compact(x)
        for module in (aoti, xnn):
            assert float((module(x) - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    with pytest.raises(ValueError, match="target"):
        export_module(compact, SIZE, "tflite")


def test_missing_executorch_names_the_mobile_extra(monkeypatch):
    monkeypatch.setattr(export_mod, "missing_packages", lambda formats=(): ["executorch"])
    with pytest.raises(ExportError, match=r"executorch .*pip install 'cdnv2\[mobile\]'"):
        require(["executorch"])


@pytest.mark.slow  # lowering to XNNPACK: a minute or more; the aoti test is the default run's compile test
@pytest.mark.timeout(1200)
def test_executorch_program_matches_pytorch_in_the_executorch_runtime(compact, tmp_path):
    pytest.importorskip("executorch")
    (c,) = export_and_check(compact, ["executorch"], tmp_path / "tiny", SIZE, class_names=["a", "b"],
                            preprocess={"resize": 36})
    assert c.ok and c.batch_sizes == [1], c
    assert c.max_abs_diff <= 1e-4 * max(1.0, c.output_scale)
    side = json.loads((tmp_path / "tiny.pte.json").read_text())
    assert side["class_names"] == ["a", "b"] and side["metadata"]["cdnv2.executorch.delegate"] == "xnnpack"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pte", "tiny.pte.json"]


# A process that never imports cdnv2: torch alone loads and runs the package.
LOAD_WITHOUT_CDNV2 = """
import json, sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
cases = torch.load(sys.argv[2])
diffs = []
with torch.no_grad():
    for x, ref in cases:
        diffs.append(float((runner(x) - ref).abs().max()))
meta = runner.get_metadata()
print(json.dumps({"diffs": diffs, "cdnv2_imported": "cdnv2" in sys.modules,
                  "class_names": json.loads(meta["cdnv2.class_names"])}))
"""


@pytest.mark.timeout(1200)  # AOTInductor compiles C++: about a minute alone, much more on a loaded CPU
@pytest.mark.ci
def test_convert_command_writes_an_aoti_package_that_runs_without_cdnv2(compact, tmp_path):
    """cdnv2-convert export=aoti: the .pt2 matches PyTorch at batch 1, 3, 32 in a torch-only
    process, and cdnv2-eval gives it the artifact's accuracy."""
    data_cfg = DataConfig(num_train=64, num_val=64, batch_size=32)
    built = build_data(data_cfg, seed=0)
    artifact = save_compact(tmp_path / "m.pt", compact, model_name="cdnv2_tiny", model_kwargs=compact.arch_kwargs(),
                            class_names=built.class_names, preprocess=built.eval_preprocess,
                            data=dataclasses.asdict(data_cfg), seed=0)
    r = cli("cdnv2-convert", f"checkpoint={artifact}", "export=aoti", "bench=false")
    assert r.returncode == 0, r.stderr
    assert "aoti" in r.stdout and "ok" in r.stdout
    pt2 = tmp_path / "m.pt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt2", "m.pt2.json"]
    assert json.loads((tmp_path / "m.pt2.json").read_text())["preprocess"] == built.eval_preprocess

    g = torch.Generator().manual_seed(3)
    cases = []
    with torch.no_grad():
        for b in (1, 3, 32):
            x = torch.randn(b, *SIZE, generator=g)
            cases.append((x, compact(x)))
    torch.save(cases, tmp_path / "cases.pt")
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_CDNV2, str(pt2), str(tmp_path / "cases.pt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["cdnv2_imported"] and result["class_names"] == built.class_names
    scale = max(float(ref.abs().max()) for _, ref in cases)
    assert len(result["diffs"]) == 3 and max(result["diffs"]) <= 1e-4 * max(1.0, scale), result

    evals = {}
    for name in ("m.pt", "m.pt2"):
        r = cli("cdnv2-eval", f"checkpoint={tmp_path / name}", f"out={tmp_path / (name + '.eval.json')}",
                "progress=none")
        assert r.returncode == 0, r.stderr
        evals[name] = json.loads((tmp_path / (name + ".eval.json")).read_text())
    assert evals["m.pt2"]["top1"] == evals["m.pt"]["top1"] and evals["m.pt2"]["samples"] == 64
    assert abs(evals["m.pt2"]["loss"] - evals["m.pt"]["loss"]) <= 1e-4
