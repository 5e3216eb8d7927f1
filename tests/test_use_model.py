"""Using a trained model: cdnv2-predict / cdnv2.Predictor, per-class evaluation,
safetensors artifacts, create_model(pretrained=PATH) and hubconf.py."""
import csv
import json
import pickle
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image

import cdnv2
from cdnv2.cli import convert as convert_cli
from cdnv2.cli import eval as eval_cli
from cdnv2.cli import predict as predict_cli
from cdnv2.errors import CheckpointError, ConfigError, DataError

from helpers import FOLDER_CLASSES, cli, restored_process_state

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tiny_folder_run):
    return tiny_folder_run[0]


@pytest.fixture(scope="module")
def val_with_corrupt(tiny_folder_run, tmp_path_factory):
    """A copy of the run's data whose val split also holds one corrupt .png."""
    root = tmp_path_factory.mktemp("data_corrupt") / "data"
    shutil.copytree(tiny_folder_run[1], root)
    (root / "val" / FOLDER_CLASSES[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


@pytest.fixture(scope="module")
def evaluated(run, val_with_corrupt, tmp_path_factory):
    """cdnv2-eval of the compact artifact on the val split (the corrupt file skipped)."""
    out = tmp_path_factory.mktemp("eval")
    cfg = eval_cli.EvalConfig(checkpoint=str(run / "model_compact.pt"), out=str(out), progress="none")
    with restored_process_state():
        record = eval_cli.run(cfg, data_overrides={"root": str(val_with_corrupt), "on_corrupt": "skip"})
    return record, out


def _no_traceback(r):
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout


# ----------------------------------------------------------------------------- predict
def test_predict_command_agrees_with_eval_and_lists_the_corrupt_file(run, val_with_corrupt, evaluated, tmp_path):
    r = cli("cdnv2-predict", f"checkpoint={run / 'model_compact.pt'}", f"input={val_with_corrupt / 'val'}",
            f"out={tmp_path / 'pred'}", "topk=3", "batch_size=7", "progress=none", "threads=1")
    assert r.returncode == 0, r.stderr[-3000:]
    _no_traceback(r)
    assert "cdnv2-predict" in r.stdout and "top-1 predictions per class" in r.stdout
    assert "unreadable: " in r.stdout and "broken.png" in r.stdout
    assert "data.on_corrupt" not in r.stdout  # a training option means nothing to predict

    doc = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    rows = doc["rows"]
    assert doc["class_names"] == sorted(FOLDER_CLASSES)
    broken = [x for x in rows if x["error"]]
    assert [Path(x["file"]).name for x in broken] == ["broken.png"] and doc["unreadable"] == 1
    good = [x for x in rows if not x["error"]]
    record, _ = evaluated
    assert len(good) == record["samples"] == 32
    assert all(len(x["topk"]) == 3 and x["topk"][0]["prob"] >= x["topk"][1]["prob"] for x in good)
    hits = sum(x["label"] == Path(x["file"]).parent.name for x in good)
    assert 100.0 * hits / len(good) == pytest.approx(record["top1"], abs=1e-9)

    with open(tmp_path / "pred" / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [x["file"] for x in table] == [x["file"] for x in rows]
    assert table[0].keys() >= {"file", "label1", "prob1", "label3", "prob3", "error"}
    assert sum(bool(x["error"]) for x in table) == 1


def test_predict_errors_are_one_paragraph_exit_2(run, tmp_path):
    # In-process: the real command's start costs seconds (the test above runs it).
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("x")
    cases = [
        (dict(checkpoint=str(run / "model_compact.pt"), input=str(tmp_path / "nowhere")),
         "input=.*nowhere: no such file or folder"),
        (dict(checkpoint=None, input=str(empty)), "checkpoint=PATH is required"),
        (dict(checkpoint=str(tmp_path / "missing.pt"), input=str(empty)), "no such file"),
        (dict(checkpoint=str(run / "model_compact.pt"), input=str(empty)), "holds no image files"),
        (dict(checkpoint=str(run / "model_compact.pt"), input=str(empty), topk=0), "must be >= 1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            predict_cli.run(predict_cli.PredictConfig(out=str(tmp_path / "o"), **kwargs))
    with pytest.raises(ConfigError, match="is a file"):
        predict_cli.run(predict_cli.PredictConfig(checkpoint=str(run / "model_compact.pt"), input=str(run),
                                                  out=str(empty / "notes.txt")))


def test_predictor_api_files_images_and_globs(run, val_with_corrupt):
    p = cdnv2.Predictor(run / "model_compact.pt", batch_size=5)
    assert p.class_names == sorted(FOLDER_CLASSES) and p.preprocess["crop"] == 32
    files = sorted((val_with_corrupt / "val" / "ring").glob("0*.png"))
    by_path = p.predict(files, topk=10)  # topk above the class count: all 4 classes
    assert all(len(x.labels) == 4 and abs(sum(x.probs) - 1) < 1e-5 for x in by_path)
    images = [Image.open(f) for f in files]
    by_image = p.predict(images, topk=2)
    assert [x.labels for x in by_image] == [x.labels[:2] for x in by_path]
    assert p.predict(str(files[0]))[0].source == str(files[0])
    broken = val_with_corrupt / "val" / FOLDER_CLASSES[0] / "broken.png"
    with pytest.raises(DataError):
        p.predict([broken])
    done, bad = p.predict_files([files[0], broken], topk=1)
    assert len(done) == 1 and bad[0][0] == str(broken) and "UnidentifiedImageError" in bad[0][1]
    in_workers, bad_too = p.predict_files([*files, broken], topk=2, workers=2)  # same batches, same rows
    assert [x.as_dict() for x in in_workers] == [x.as_dict() for x in p.predict(files, topk=2)]
    assert bad_too == bad
    found = predict_cli.find_images(str(val_with_corrupt / "val" / "**" / "0*.png"))
    assert len(found) == 32 and all(f.suffix == ".png" for f in found)


def test_predict_onnx_export_matches_pytorch(run, val_with_corrupt, tmp_path):
    pytest.importorskip("onnxruntime")
    art = tmp_path / "model.pt"
    shutil.copy(run / "model_compact.pt", art)
    with restored_process_state():
        convert_cli.run(convert_cli.ConvertConfig(checkpoint=str(art), export="onnx", bench=False))
    files = sorted((val_with_corrupt / "val").glob("*/00*.png"))
    want = cdnv2.Predictor(art).predict(files)
    got = cdnv2.Predictor(tmp_path / "model.onnx").predict(files)
    assert [x.labels for x in got] == [x.labels for x in want]
    assert max(abs(a - b) for x, y in zip(got, want) for a, b in zip(x.probs, y.probs)) < 1e-4
    (tmp_path / "model.onnx.json").unlink()
    with pytest.raises(CheckpointError, match="no sidecar"):
        cdnv2.Predictor(tmp_path / "model.onnx")


@pytest.mark.slow  # the AOTInductor compile takes minutes on a busy 2-core machine
def test_predict_aoti_package_matches_pytorch(run, val_with_corrupt, tmp_path):
    art = tmp_path / "model.pt"
    shutil.copy(run / "model_compact.pt", art)
    with restored_process_state():
        convert_cli.run(convert_cli.ConvertConfig(checkpoint=str(art), export="aoti", bench=False))
    files = sorted((val_with_corrupt / "val").glob("*/00*.png"))
    want = cdnv2.Predictor(art).predict(files)
    got = cdnv2.Predictor(tmp_path / "model.pt2").predict(files)
    assert [x.labels for x in got] == [x.labels for x in want]
    assert max(abs(a - b) for x, y in zip(got, want) for a, b in zip(x.probs, y.probs)) < 1e-4


# ----------------------------------------------------------------------------- per-class eval
def test_per_class_numbers_agree_with_top1(evaluated):
    record, out = evaluated
    assert record["samples"] == 32  # the corrupt file skipped
    scores = record["per_class"]
    assert [s["name"] for s in scores] == sorted(FOLDER_CLASSES)
    assert sum(s["samples"] for s in scores) == record["samples"]
    assert 100.0 * sum(s["correct"] for s in scores) / record["samples"] == pytest.approx(record["top1"], abs=1e-9)
    matrix = record["confusion_matrix"]["counts"]
    assert [row[i] for i, row in enumerate(matrix)] == [s["correct"] for s in scores]

    with open(out / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["samples"]) for r in rows] == [s["samples"] for s in scores]
    assert [int(r["correct"]) for r in rows] == [s["correct"] for s in scores]
    with open(out / "confusion.csv", newline="") as f:
        grid = list(csv.reader(f))
    assert grid[0][1:] == sorted(FOLDER_CLASSES)
    assert [[int(v) for v in row[1:]] for row in grid[1:]] == matrix
    assert (out / "confusion.png").stat().st_size > 1000
    saved = json.loads((out / "eval.json").read_text())
    assert saved["per_class"] == scores and saved["files"]["confusion_png"] == str(out / "confusion.png")


def test_confusion_helpers_on_a_known_matrix(tmp_path):
    from cdnv2 import confusion

    m = torch.tensor([[5, 3, 0], [0, 2, 0], [1, 0, 0]])
    scores = confusion.per_class(m, ["a", "b", "c"])
    assert [s.accuracy for s in scores] == [62.5, 100.0, 0.0]
    assert (scores[0].confused_with, scores[0].confused_count) == ("b", 3)
    assert [s.name for s in confusion.worst_classes(scores, 2)] == ["c", "a"]
    top = confusion.top_confusions(m, ["a", "b", "c"], 5)
    assert [(t["true"], t["predicted"], t["count"]) for t in top] == [("a", "b", 3), ("c", "a", 1)]
    big = torch.eye(101, dtype=torch.int64)
    assert "too many" in confusion.plot_confusion(tmp_path / "x.png", big)
    assert confusion.summary(big)["confusion_matrix"] is None
    assert confusion.companion(tmp_path / "eval.json", "per_class.csv").name == "per_class.csv"
    assert confusion.companion(tmp_path / "b.json", "per_class.csv").name == "b_per_class.csv"


# ----------------------------------------------------------------------------- safetensors
def _refuse(*args, **kwargs):
    raise AssertionError("pickle used while loading a safetensors file")


def test_safetensors_round_trip_reads_no_pickle(run, tmp_path):
    ref = cdnv2.load_model(run / "model_compact.pt")
    meta = ref.cdnv2_meta
    path = cdnv2.save_compact(tmp_path / "m.safetensors", ref, model_name=meta["model_name"],
                              model_kwargs=meta["model_kwargs"], class_names=meta["class_names"],
                              preprocess=meta["preprocess"], format="safetensors")
    with mock.patch.object(pickle, "Unpickler", _refuse), mock.patch.object(pickle, "load", _refuse), \
            mock.patch.object(pickle, "loads", _refuse), mock.patch.object(torch, "load", _refuse):
        model = cdnv2.load_model(path)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    for key in ("model_name", "model_kwargs", "class_names", "preprocess", "structure"):
        assert model.cdnv2_meta[key] == meta[key], key
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        assert f.get_tensor("features.denseblock_1.denselayer_1.conv_1.index").dtype == torch.int16
    assert json.loads(header["class_names"]) == sorted(FOLDER_CLASSES) and header["kind"] == "compact"
    auto = cdnv2.save_compact(tmp_path / "auto.safetensors", ref, model_name=meta["model_name"],
                              model_kwargs=meta["model_kwargs"])  # format="auto": by the suffix
    assert auto.read_bytes()[8:9] == b"{"  # a safetensors header, not a zip
    with pytest.raises(ValueError, match="format="):
        cdnv2.save_compact(tmp_path / "m.bin", ref, model_name="cdnv2_tiny", model_kwargs={}, format="npz")


def test_convert_export_safetensors_and_eval_reads_it(run, tmp_path):
    art = tmp_path / "model.pt"
    shutil.copy(run / "model_compact.pt", art)
    with restored_process_state():
        summary = convert_cli.run(convert_cli.ConvertConfig(checkpoint=str(art), export="safetensors", bench=False))
    shared = Path(summary["safetensors"])
    assert shared == tmp_path / "model.safetensors"
    loaded = cdnv2.checkpoint.open_checkpoint(shared)
    assert loaded.kind == "compact" and loaded.data_config["name"] == "imagefolder"
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(CheckpointError, match="safetensors"):
        cdnv2.load_model(tmp_path / "junk.safetensors")


# ----------------------------------------------------------------------------- hub / pretrained
def test_torch_hub_load_local_and_pretrained_paths(run, tmp_path):
    ref = cdnv2.load_model(run / "model_compact.pt")
    model = torch.hub.load(str(REPO), "cdnv2_tiny", source="local", weights=str(run / "model_compact.pt"),
                           trust_repo=True, verbose=False)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    import importlib.util

    spec = importlib.util.spec_from_file_location("cdnv2_hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert all(callable(getattr(hubconf, name)) for name in cdnv2.list_models())
    assert cdnv2.create_model("cdnv2_tiny", pretrained=run / "model_compact.pt", num_classes=7)(x).shape == (2, 7)
    with pytest.raises(ValueError, match="downloads no weights"):
        cdnv2.create_model("cdnv2_tiny", pretrained=True)
    with pytest.raises(ValueError, match="does not match the weights"):
        cdnv2.create_model("cdnv2_tiny", pretrained=run / "model_compact.pt", growth=(4, 4, 4))
    with pytest.raises(CheckpointError, match="holds a cdnv2_tiny model"):
        cdnv2.create_model("cdnv2_a", pretrained=run / "model_compact.pt")
    with pytest.raises(ValueError, match="cdnv2.create_model"):
        cdnv2.models.create_model("cdnv2_tiny", pretrained="x.pt")


def _official_spelling(model):
    """A fresh masked model's state dict as an official unconverted release file spells it."""
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if key.startswith("se_last."):
            key = "features." + key
        if leaf == "mask":
            out[owner + "._mask"] = value.clone()
        elif leaf == "stage":
            out[owner + "._stage"] = torch.tensor([float(value)])
            out[owner + "._count"] = torch.tensor([0.0])
        else:
            out[key] = value.clone()
    return out


def test_pretrained_official_release_file(tmp_path):
    torch.manual_seed(3)
    ref = cdnv2.create_model("cdnv2_a").eval()
    path = tmp_path / "cdnv2_a_official.pth.tar"
    torch.save({"state_dict": _official_spelling(ref)}, path)
    model = cdnv2.create_model("cdnv2_a", pretrained=path)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
    assert model.cdnv2_meta["preprocess"]["crop"] == 224
