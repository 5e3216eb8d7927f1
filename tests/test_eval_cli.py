"""cdnv2-eval and cdnv2-convert on a freshly trained tiny run: exact re-evaluation,
compact and official-layout files, cost report, export round trip, clear errors."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import cdnv2
from cdnv2.cli import eval as eval_cli
from cdnv2.compact.official import guess_official_variant
from cdnv2.data import DataConfig
from cdnv2.errors import CheckpointError, ConfigError
from cdnv2.models import create_model

from helpers import TINY_DATA, cli, converted_layout, load

# The shapes data's own eval transform: what an official-layout file (which records none)
# must be told to use on this data instead of the ImageNet 256/224 default.
SHAPES_PREPROCESS = dict(image_size=32, eval_resize=None, interpolation="bilinear",
                         mean=[0.5, 0.5, 0.5], std=[0.3, 0.3, 0.3])


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    """The session's tiny run (EMA weights, stage snapshots; trained with cdnv2-train's runtime)."""
    return tiny_run


@pytest.fixture(scope="module")
def report(run_dir):
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _eval(checkpoint, out_dir, data=None, **overrides):
    cfg = eval_cli.EvalConfig(checkpoint=str(checkpoint), out=str(out_dir), progress="none")
    return eval_cli.run(cfg, data=data, data_overrides=overrides or None)


def _no_traceback(r):
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout


# ----------------------------------------------------------------------------- eval
def test_eval_command_equals_the_trainers_report(run_dir, report, tmp_path):
    r = cli("cdnv2-eval", f"checkpoint={run_dir / 'checkpoints/last.pt'}", f"out={tmp_path}", "progress=none")
    assert r.returncode == 0, r.stderr[-3000:]
    _no_traceback(r)
    assert "cdnv2-eval" in r.stdout and "top-1 / top-5" in r.stdout
    got = json.loads((tmp_path / "eval.json").read_text())
    assert report["weights"] == got["weights"] == "ema"
    for key in ("top1", "top5", "loss", "samples"):
        assert got[key] == report[key], key  # exactly: same data, same model, same evaluate()
    assert got["images_per_second"] > 0
    assert got["data"]["source"] == "checkpoint" and got["data"]["seed"] == 0
    assert got["preprocess"] == load(run_dir / "checkpoints/last.pt")["preprocess"]


def test_eval_json_defaults_to_the_checkpoint_folder_and_raw_weights(run_dir, report, tmp_path):
    ckpt = tmp_path / "last.pt"
    shutil.copy(run_dir / "checkpoints/last.pt", ckpt)
    cfg = eval_cli.EvalConfig(checkpoint=str(ckpt), weights="raw", progress="none")
    raw = eval_cli.run(cfg)
    assert (tmp_path / "eval.json").is_file() and raw["weights"] == "raw"
    assert raw["samples"] == report["samples"]


def test_compact_artifact_matches_the_masked_eval(run_dir, report, tmp_path):
    artifact = run_dir / "model_compact.pt"
    bare = load(artifact)
    bare["data"] = None  # an artifact without the run's data config needs data=...
    torch.save(bare, tmp_path / "bare.pt")
    with pytest.raises(ConfigError, match="does not record its data config.*data=imagenet"):
        _eval(tmp_path / "bare.pt", tmp_path)
    assert _eval(tmp_path / "bare.pt", tmp_path, data=DataConfig(**TINY_DATA))["samples"] == report["samples"]
    got = _eval(artifact, tmp_path)  # the trainer's artifact records its data config and seed
    assert got["structure"] == "compact" and got["samples"] == report["samples"]
    assert got["loss"] == pytest.approx(report["loss"], abs=1e-5)
    assert abs(got["top1"] - report["top1"]) <= 100 / 128  # at most one borderline sample flips
    assert got["top1"] == pytest.approx(report["compact"]["top1"], abs=100 / 128)


def test_cost_report_masked_and_compact_side_by_side(run_dir, tmp_path):
    snapshot = run_dir / "checkpoints/condense-step0000004.pt"  # last stage: masked, fully condensed
    assert load(snapshot)["structure"] == "masked"
    cfg = eval_cli.EvalConfig(checkpoint=str(snapshot), out=str(tmp_path), progress="none",
                              cost=True, cost_batch=4, bench_seconds=0.0)
    got = eval_cli.run(cfg)
    masked, compact = got["cost"]["models"]["masked"], got["cost"]["models"]["compact"]
    assert masked["paper_flops"] == pytest.approx(compact["paper_flops"])
    assert compact["exec_flops"] < masked["exec_flops"] and compact["params"] < masked["params"]
    for c in (masked, compact):
        assert c["latency_ms_batch1"] > 0 and c["throughput_images_per_second"] > 0
        assert c["throughput_batch"] == 4
    assert got["cost"]["threads"] >= 1 and "CPU" in got["cost"]["device"]


def _to_official_layout(state: dict) -> dict:
    """Our masked state dict renamed to the official release's unconverted keys (SPEC 7)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".mask"):
            key = key[: -len("mask")] + "_mask"
        elif key.endswith(".stage"):
            out[key[: -len("stage")] + "_count"] = torch.zeros(1)
            key, value = key[: -len("stage")] + "_stage", value.float().reshape(1)
        elif key.startswith("se_last."):
            key = "features." + key
        out["module." + key] = value
    return out


def test_official_layout_file_evaluates_like_the_original(run_dir, tmp_path):
    snapshot = run_dir / "checkpoints/condense-step0000004.pt"
    state = load(snapshot)
    official = tmp_path / "official.pth.tar"
    torch.save({"state_dict": _to_official_layout(state["model_state"]), "epoch": 2}, official)
    with pytest.raises(Exception, match="official=<model>"):  # tiny is none of cdnv2_a/b/c
        eval_cli.run(eval_cli.EvalConfig(checkpoint=str(official), out=str(tmp_path)))
    ref_cfg = eval_cli.EvalConfig(checkpoint=str(snapshot), out=str(tmp_path / "ref"), progress="none", weights="raw")
    ref = eval_cli.run(ref_cfg)
    cfg = eval_cli.EvalConfig(checkpoint=str(official), official="cdnv2_tiny", out=str(tmp_path), progress="none")
    got = eval_cli.run(cfg, data=DataConfig(**TINY_DATA), data_overrides=SHAPES_PREPROCESS)
    assert got["kind"] == "official" and got["structure"] == "masked"
    for key in ("top1", "top5", "loss", "samples"):
        assert got[key] == ref[key], key
    # cdnv2-convert turns the official unconverted file into our compact artifact
    from cdnv2.cli import convert as convert_cli

    out = tmp_path / "official_compact.pt"
    convert_cli.run(convert_cli.ConvertConfig(checkpoint=str(official), official="cdnv2_tiny", out=str(out),
                                              parity_samples=2, bench=False))
    compact, masked = cdnv2.load_model(out), cdnv2.load_model(snapshot, weights="raw")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compact(x), masked(x), atol=1e-5)


def test_converted_official_file_with_ema_and_args(run_dir, tmp_path):
    import argparse

    snapshot = run_dir / "checkpoints/condense-step0000004.pt"
    raw = cdnv2.load_model(snapshot, weights="raw")
    ema = cdnv2.load_model(snapshot, weights="ema")
    official = tmp_path / "converted.pth.tar"
    torch.save({"epoch": 1, "args": argparse.Namespace(model="cdnv2_tiny"),  # as timm's saver writes
                "state_dict": converted_layout(raw, "module."),
                "state_dict_ema": converted_layout(ema, "module.")}, official)
    ref = eval_cli.run(eval_cli.EvalConfig(checkpoint=str(snapshot), out=str(tmp_path / "ref"), progress="none"))
    cfg = eval_cli.EvalConfig(checkpoint=str(official), official="cdnv2_tiny", out=str(tmp_path), progress="none")
    got = eval_cli.run(cfg, data=DataConfig(**TINY_DATA), data_overrides=SHAPES_PREPROCESS)
    assert (got["kind"], got["structure"], got["weights"]) == ("official", "compact", "ema")
    assert got["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    assert abs(got["top1"] - ref["top1"]) <= 100 / 128


def test_official_variant_is_detected_from_the_keys():
    for name in ("cdnv2_a", "cdnv2_b", "cdnv2_c"):
        with torch.device("meta"):
            state = _to_official_layout(create_model(name).state_dict())
        assert guess_official_variant(state) == name


# ----------------------------------------------------------------------------- convert / export
def test_convert_command_and_torchscript_round_trip(run_dir, tmp_path):
    out = tmp_path / "tiny_compact.pt"
    r = cli("cdnv2-convert", f"checkpoint={run_dir / 'checkpoints/last.pt'}", f"out={out}", "export=torchscript",
            "threads=1", "bench=false")  # timings: see the cost report test
    assert r.returncode == 0, r.stderr[-3000:]
    _no_traceback(r)
    for text in ("masked", "compact", "paper-rule FLOPs", "weights file (MB)", "parity: max |diff|", "torchscript"):
        assert text in r.stdout, text
    compact = cdnv2.load_model(out)
    artifact = load(out)
    assert artifact["data"]["num_val"] == 128 and artifact["seed"] == 0  # eval needs no data=...
    x = torch.randn(5, 3, 32, 32)
    scripted = torch.jit.load(str(tmp_path / "tiny_compact.torchscript.pt"))
    with torch.no_grad():
        ref, got = compact(x), scripted(x)  # a batch size the trace never saw
    assert torch.allclose(ref, got, atol=1e-5), (ref - got).abs().max()
    # the converted artifact equals the trainer's: same masks, same EMA weights
    trainer_artifact = load(run_dir / "model_compact.pt")["model_state"]
    for key, value in artifact["model_state"].items():
        assert torch.allclose(value.float(), trainer_artifact[key].float(), atol=1e-6), key


# ----------------------------------------------------------------------------- errors
def _image_tree(root: Path, classes) -> Path:
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32), (40, 80, 120)).save(root / split / c / "0.png")
    return root


def test_eval_command_errors_are_one_clear_paragraph(run_dir, tmp_path):
    root = _image_tree(tmp_path / "tree", ["circle", "square", "zebra"])
    args = [f"checkpoint={run_dir / 'checkpoints/last.pt'}", "data=imagefolder", f"data.root={root}",
            "data.num_workers=0"]
    r = cli("cdnv2-eval", *args, f"out={tmp_path}")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    _no_traceback(r)
    assert r.stderr.startswith("cdnv2-eval: error:") and "do not match the dataset's" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "only in the checkpoint: 'triangle'" in r.stderr and "only in the data: 'zebra'" in r.stderr
    assert not (tmp_path / "eval.json").exists()


@pytest.mark.parametrize("case", ["missing", "truncated", "foreign", "empty", "directory"])
def test_unreadable_files_exit_with_a_message(run_dir, tmp_path, case, capsys):
    # The command's own error path (run_user_command), in-process to spare a start-up each.
    from cdnv2.cli.common import run_user_command

    path = tmp_path / f"{case}.pt"
    if case == "missing":
        expected = "no such file"
    elif case == "truncated":
        data = (run_dir / "checkpoints/last.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        expected = "cannot be read"
    elif case == "foreign":
        torch.save([1, 2, 3], path)
        expected = "is not a cdnv2 checkpoint or an official CondenseNetV2 file (it holds a list)"
    elif case == "empty":
        path.touch()
        expected = "is empty (0 bytes)"
    else:
        path = run_dir
        expected = f"is a directory, not a checkpoint file; this looks like a run directory, e.g. checkpoint={run_dir}"
    cfg = eval_cli.EvalConfig(checkpoint=str(path), out=str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        run_user_command("cdnv2-eval", lambda: eval_cli.run(cfg), (CheckpointError,))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cdnv2-eval: error: checkpoint=") and expected in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "eval.json").exists()
