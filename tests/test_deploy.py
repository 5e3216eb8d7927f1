"""Deployment: the runtime graph of a compact model, ONNX / OpenVINO round trips, int8."""
import json

import numpy as np
import pytest
import torch

import cdnv2
from cdnv2.data import DataConfig, build_data
from cdnv2.deploy import ExportError, build_deploy_model, export_and_check, export_onnx, require_onnx
from cdnv2.deploy.forms import ALL_FORMS, measure_forms
from cdnv2.deploy.graph import PREACT_FORM, PREACT_FORMS, PreAct, compact_layers, layer_input_sizes
from cdnv2.layers import CondensingConv1x1
from helpers import TINY_DATA, condensed_tiny

pytest.importorskip("onnxruntime", reason="deployment needs the cdnv2[export] extra")
pytest.importorskip("openvino", reason="deployment needs the cdnv2[export] extra")

SIZE = (3, 32, 32)


@pytest.fixture(scope="module")
def compact():
    return condensed_tiny()


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """The session's tiny trained run (read-only)."""
    return tiny_run


@pytest.mark.parametrize("preact", PREACT_FORMS)
@pytest.mark.parametrize("form", ALL_FORMS)
def test_every_layer_form_is_exact(compact, form, preact):
    deploy = build_deploy_model(compact, forms=form, input_size=SIZE, preact=preact)
    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        ref, got = compact(x), deploy(x)
    assert deploy.forms == [form] * len(compact_layers(compact))
    norms = [m.norm for m in deploy.modules() if isinstance(m, PreAct)]
    kind = torch.nn.BatchNorm2d if preact == "bn" else torch.nn.Conv2d
    assert norms and all(isinstance(n, kind) for n in norms)
    assert (ref - got).abs().max() <= 1e-5 * max(1.0, ref.abs().max())


def test_masked_model_is_converted_first():
    torch.manual_seed(0)
    masked = cdnv2.create_model("cdnv2_tiny").eval()
    with pytest.raises(ValueError, match="not fully condensed"):
        build_deploy_model(masked, input_size=SIZE)
    for m in masked.modules():
        if isinstance(m, CondensingConv1x1):
            while not m.fully_condensed:
                m.condense_step()
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.allclose(build_deploy_model(masked, input_size=SIZE)(x), masked(x), atol=1e-5)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_round_trip_matches_pytorch_at_batch_1_3_32(compact, tmp_path, runtime):
    fmt = "onnx" if runtime == "onnxruntime" else "openvino"
    (c,) = export_and_check(compact, [fmt], tmp_path / "tiny", SIZE, class_names=["a", "b"],
                            preprocess={"crop": 32})
    assert c.ok and c.batch_sizes == [1, 3, 32], c
    assert c.max_abs_diff <= 1e-4 * max(1.0, c.output_scale)
    forms = c.metadata["cdnv2.deploy.layer_forms"].split(",")
    assert len(forms) == len(compact_layers(compact)) and set(forms) <= set(ALL_FORMS)
    assert c.metadata["cdnv2.deploy.runtime"] == runtime
    assert c.metadata["cdnv2.deploy.preact_form"] == PREACT_FORM[runtime]
    side = json.loads((tmp_path / f"tiny{'.onnx' if fmt == 'onnx' else '.xml'}.json").read_text())
    assert side["class_names"] == ["a", "b"] and side["preprocess"] == {"crop": 32}
    if fmt == "onnx":
        # plain convolutions, no scatter, no batched GEMMs, standard operators only
        assert "Conv" in c.op_types and not {"ScatterND", "MatMul", "Transpose"} & set(c.op_types)
        assert all("::" not in op for op in c.op_types)
    else:
        import openvino as ov

        ir = ov.Core().read_model(str(tmp_path / "tiny.xml"))
        assert ir.get_rt_info(["cdnv2", "deploy.layer_forms"]).astype(str) == c.metadata["cdnv2.deploy.layer_forms"]


def test_openvino_sessions_freed_in_any_order_leave_signal_handlers_working(compact, tmp_path):
    """Two OpenVINO sessions freed in creation order, then a Python signal handler: with a
    Core per session the handler ran on a freed alternate stack and the process died with
    SIGSEGV (the crash that once split `make test` in two; docs/testing.md)."""
    import gc
    import os
    import signal

    from cdnv2.deploy.sessions import openvino_session

    (c,) = export_and_check(compact, ["openvino"], tmp_path / "tiny", SIZE)
    x = np.zeros((1, *SIZE), np.float32)
    first = openvino_session(c.path)
    second = openvino_session(c.path)
    assert np.array_equal(first(x), second(x))
    del first
    gc.collect()
    del second
    gc.collect()
    ran = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: ran.append(True))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert ran


def test_every_conv_reads_its_weights_from_initializers(tmp_path):
    """Untrained BNs fold to equal (zero) biases, which the exporter would share through
    Identity nodes; onnxruntime's quantizer then leaves those biases fp32."""
    import onnx

    torch.manual_seed(0)
    model = cdnv2.condense_fully(cdnv2.create_model("cdnv2_tiny")).eval()
    path = export_onnx(model, torch.randn(1, *SIZE), tmp_path / "fresh.onnx")
    graph = onnx.load(str(path)).graph
    inits = {t.name for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(set(n.input[1:]) <= inits for n in convs)
    assert not [n for n in graph.node if n.op_type == "Identity"]


def test_openvino_int8_refuses_the_depthwise_pre_activation_form(compact, tmp_path):
    """The fp32 OpenVINO graph's depthwise pre-activation convs crash or derail NNCF int8 on
    AVX512 CPUs: quantizing that form is refused and names the form to quantize."""
    import openvino as ov

    from cdnv2.deploy.quantize import _per_channel_affines, quantize_openvino_file

    path = export_onnx(compact, torch.randn(2, *SIZE), tmp_path / "ov.onnx", runtime="openvino")
    deploy = build_deploy_model(compact, "openvino", input_size=SIZE)
    names = _per_channel_affines(ov.Core().read_model(str(path)))
    assert len(names) == sum(isinstance(m, PreAct) for m in deploy.modules()) > 0
    with pytest.raises(ValueError, match="preact='bn'"):
        quantize_openvino_file(path, tmp_path / "ov.int8.xml", [np.zeros((2, *SIZE), np.float32)])
    assert not (tmp_path / "ov.int8.xml").exists()


@pytest.mark.parametrize("bad", [{"preact": "batchnorm"}, {"runtime": "tensorrt"}])
def test_unknown_graph_options_are_refused_not_traced_as_is(compact, tmp_path, bad):
    (key, value), = bad.items()
    with pytest.raises(ExportError, match=f"{key}='{value}'"):
        export_onnx(compact, torch.randn(2, *SIZE), tmp_path / "x.onnx", **bad)
    assert not (tmp_path / "x.onnx").exists()


def test_batch_one_example_keeps_the_batch_axis_dynamic(compact, tmp_path):
    import onnx
    import onnxruntime as ort

    path = export_onnx(compact, torch.randn(1, *SIZE), tmp_path / "b1.onnx")
    dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value
    x = torch.randn(5, *SIZE)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, compact(x).numpy(), atol=1e-4)


def test_measured_forms_are_valid(compact):
    layers = compact_layers(compact)[:2]
    sizes = layer_input_sizes(compact.features, SIZE)[:2]
    seen = []
    forms = measure_forms(layers, sizes, "openvino", batch=2, repeats=1, report=lambda i, t: seen.append(t))
    assert len(forms) == 2 and all(f in ALL_FORMS for f in forms)
    assert all(set(t) == set(ALL_FORMS) and min(t.values()) > 0 for t in seen)


def test_missing_extra_names_the_install_command(monkeypatch):
    import cdnv2.deploy.export as export_mod

    monkeypatch.setattr(export_mod, "missing_packages", lambda formats=("onnx",): ["onnxruntime"])
    with pytest.raises(ExportError, match=r"pip install 'cdnv2\[export\]'"):
        require_onnx()


def test_int8_keeps_accuracy_on_the_quickstart_data(run_dir, tmp_path):
    """NNCF and onnxruntime int8 of a trained tiny model: top-1 within a few points of fp32."""
    from cdnv2.deploy.quantize import calibration_images, compare_int8, openvino_int8_source, val_batches

    compact = cdnv2.load_model(run_dir / "model_compact.pt")
    data = build_data(DataConfig(**TINY_DATA), seed=0)
    calib = calibration_images(data, 128)
    assert sum(len(b) for b in calib) == 128 and calib[0].shape[1:] == SIZE
    val = val_batches(data)
    checks = export_and_check(compact, ["onnx", "openvino"], tmp_path / "tiny", SIZE)
    bn_form = openvino_int8_source(compact, SIZE, tmp_path / "bn.onnx")
    for c in checks:
        source = bn_form if c.format == "openvino" else None
        r = compare_int8(c.format, c.path, calib, val, batch=8, repeats=1, source=source)
        assert r.val_images == 128
        assert abs(r.int8_top1 - r.fp32_top1) <= 5.0, r
        assert r.agreement >= 90.0, r  # a barely trained model's top-1 is near chance: compare predictions
        assert r.int8_ms > 0 and r.fp32_ms > 0


@pytest.mark.slow
def test_convert_command_exports_openvino_and_int8(run_dir, tmp_path, capsys):
    from cdnv2.cli import convert as convert_cli

    cfg = convert_cli.ConvertConfig(checkpoint=str(run_dir / "checkpoints/last.pt"), out=str(tmp_path / "m.pt"),
                                    export="openvino", quantize="int8", calib_images=64, bench=False,
                                    cost_batch=4)
    summary = convert_cli.run(cfg)
    out = capsys.readouterr().out
    assert (tmp_path / "m.xml").exists() and (tmp_path / "m.bin").exists() and (tmp_path / "m.int8.xml").exists()
    (check,) = summary["exports"]
    assert check["ok"] and check["format"] == "openvino"
    (r,) = summary["int8"]
    assert r["val_images"] == TINY_DATA["num_val"] and "int8 vs fp32" in out and "speed-up" in out


@pytest.mark.slow
def test_quantize_without_an_export_is_refused(run_dir, tmp_path):
    from helpers import cli

    r = cli("cdnv2-convert", f"checkpoint={run_dir / 'model_compact.pt'}", "quantize=int8")
    assert r.returncode == 2 and "add export=onnx" in r.stderr and "Traceback" not in r.stderr


def test_convert_refuses_bad_outputs_and_threads_up_front(run_dir, tmp_path, capsys):
    """A compact artifact as input takes the same up-front checks as a training checkpoint:
    one case through the real command, the others through its error path in-process (each
    command start costs seconds)."""
    from cdnv2.cli import convert as convert_cli
    from cdnv2.cli.common import run_user_command
    from helpers import cli

    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("not a folder")
    artifact = run_dir / "model_compact.pt"
    r = cli("cdnv2-convert", f"checkpoint={artifact}", "threads=-1", "export=onnx")
    assert r.returncode == 2 and "threads=-1 must be >= 1" in r.stderr and "Traceback" not in r.stderr, r.stderr
    cases = {
        tmp_path / "folder": "is a folder",
        tmp_path / "m.onnx": "give it a .pt name",
        tmp_path / "afile" / "m.pt": "is not writable",
    }
    for out, message in cases.items():
        cfg = convert_cli.ConvertConfig(checkpoint=str(artifact), out=str(out), export="onnx")
        with pytest.raises(SystemExit) as e:
            run_user_command("cdnv2-convert", lambda: convert_cli.run(cfg))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("cdnv2-convert: error: ") and message in err, (out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]
    assert not list((tmp_path / "folder").iterdir())
