"""Inputs a user (or a stranger's file) can give that once ended in a traceback or wrote
into a run's own folders: each is a one-paragraph user error now."""
import json

import pytest
import torch
from PIL import Image

import cdnv2
from cdnv2.cli import predict as predict_cli
from cdnv2.errors import UserError

from helpers import condensed_tiny

PREPROCESS = {"resize": 32, "crop": 32, "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A compact cdnv2_tiny saved as .safetensors, its tensors and metadata, and one image."""
    from safetensors import safe_open

    root = tmp_path_factory.mktemp("shared")
    path = cdnv2.save_compact(root / "m.safetensors", condensed_tiny(), model_name="cdnv2_tiny",
                              model_kwargs={}, class_names=[str(i) for i in range(10)],
                              preprocess=PREPROCESS)
    with safe_open(str(path), "pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    image = root / "a.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    return root, meta, state, image


BAD_METADATA = [
    ("preprocess", "[1, 2]", "not a dict"),
    ("preprocess", json.dumps({**PREPROCESS, "crop": "abc"}), "crop='abc'"),
    ("preprocess", json.dumps({**PREPROCESS, "crop": -5}), "crop=-5"),
    ("preprocess", json.dumps({**PREPROCESS, "resize": 10**6}), "resize=1000000"),  # once: a 10^12-pixel resize
    ("preprocess", json.dumps({**PREPROCESS, "std": [0, 0, 0]}), "std="),
    ("preprocess", json.dumps({**PREPROCESS, "mean": "x"}), "mean="),
    ("class_names", "5", "class_names must be a list of strings"),
    ("model_kwargs", "[1]", "model_kwargs a dict"),
    ("version", "2", "version 2 is not one this cdnv2 reads"),  # from a newer cdnv2: refused, not half-read
]


@pytest.mark.parametrize("key,value,message", BAD_METADATA)
def test_edited_safetensors_metadata_is_a_checkpoint_error(shared, key, value, message):
    from safetensors.torch import save_file

    root, meta, state, image = shared
    path = root / f"edited_{key}.safetensors"
    save_file(state, str(path), metadata={**meta, key: value})
    with pytest.raises(UserError, match=message):
        cdnv2.load_model(path)
    with pytest.raises(UserError, match=message):
        cdnv2.Predictor(path).predict([image], topk=2)


def test_valid_and_partial_preprocess_still_load(shared, tmp_path):
    from safetensors.torch import save_file

    root, meta, state, image = shared
    p = cdnv2.Predictor(root / "m.safetensors")
    assert len(p.predict([image], topk=2)[0].labels) == 2
    partial = tmp_path / "partial.safetensors"  # save_compact takes any dict: loading keeps it
    save_file(state, str(partial), metadata={**meta, "preprocess": json.dumps({"crop": 32})})
    assert cdnv2.load_model(partial).cdnv2_meta["preprocess"] == {"crop": 32}
    with pytest.raises(UserError, match="lacks the key"):  # but it cannot make a transform
        cdnv2.Predictor(partial)


def test_predict_out_into_a_runs_own_folder_is_refused(shared, tmp_path):
    root, _, _, image = shared
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".cdnv2-run.lock").write_text("")
    for sub in (".hydra", "tb"):
        cfg = predict_cli.PredictConfig(checkpoint=str(root / "m.safetensors"), input=str(image),
                                        out=str(run / sub), progress="none")
        with pytest.raises(UserError, match="own files"):
            predict_cli.run(cfg)
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == [] and not (run / "tb").exists()


@pytest.mark.parametrize("sidecar,message", [
    ("[1, 2]", "records no preprocess"),
    (json.dumps({"preprocess": {**PREPROCESS, "crop": 0}}), "crop=0"),
    (json.dumps({"preprocess": PREPROCESS, "class_names": "abc"}), "class_names must be a list"),
])
def test_edited_export_sidecar_is_a_checkpoint_error(shared, tmp_path, sidecar, message):
    from cdnv2.predict import load_onnx

    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not read: the sidecar is checked first")
    (tmp_path / "m.onnx.json").write_text(sidecar)
    with pytest.raises(UserError, match=message):
        load_onnx(onnx, torch.device("cpu"), "auto")


def test_refused_predict_and_viz_create_no_folder_and_stay_out_of_run_folders(shared, tmp_path):
    from cdnv2.cli import viz as viz_cli

    root, _, _, image = shared
    evil = tmp_path / "not_a_checkpoint.pt"
    evil.write_bytes(b"garbage")
    with pytest.raises(UserError):
        predict_cli.run(predict_cli.PredictConfig(checkpoint=str(evil), input=str(image),
                                                  out=str(tmp_path / "pred"), progress="none"))
    with pytest.raises(UserError, match="no such file"):
        viz_cli.run(viz_cli.VizConfig(checkpoint=str(tmp_path / "nowhere" / "x.pt")))
    assert not (tmp_path / "pred").exists() and not (tmp_path / "nowhere").exists()
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".cdnv2-run.lock").write_text("")
    with pytest.raises(UserError, match="own files"):
        viz_cli.run(viz_cli.VizConfig(checkpoint=str(root / "m.safetensors"), out=str(run / ".hydra")))
    assert list((run / ".hydra").iterdir()) == []


@pytest.mark.parametrize("shift", [10**4, -10**4])
def test_edited_index_buffer_is_a_checkpoint_error(shared, tmp_path, shift):
    """Out-of-range channel indices once loaded fine and failed in forward (IndexError)."""
    from safetensors.torch import save_file

    root, meta, state, image = shared
    key = next(k for k in state if k.endswith("sfr.index"))
    path = tmp_path / "edited_index.safetensors"
    save_file({**state, key: state[key] + shift}, str(path), metadata=meta)
    with pytest.raises(UserError, match="channel indices outside"):
        cdnv2.load_model(path)


@pytest.mark.parametrize("sidecar,message", [
    ("[1]", "does not record the model"),
    ("{not json", "cannot be read as JSON"),
    (json.dumps({"source": {"model": "cdnv2_tiny"}, "preprocess": {**PREPROCESS, "crop": "x"}}), "crop='x'"),
])
def test_edited_aoti_sidecar_is_a_user_error(tmp_path, sidecar, message):
    from cdnv2.cli import eval as eval_cli

    package = tmp_path / "m.pt2"
    package.write_bytes(b"not read: the sidecar is checked first")
    (tmp_path / "m.pt2.json").write_text(sidecar)
    with pytest.raises(UserError, match=message):
        eval_cli.open_aoti_package(package, eval_cli.EvalConfig(checkpoint=str(package), device="cpu"))


def test_convert_names_safetensors_among_the_export_choices():
    from cdnv2.cli import convert as convert_cli

    with pytest.raises(UserError, match="use one of .*safetensors"):
        convert_cli.validate(convert_cli.ConvertConfig(checkpoint="x.pt", export="bogus"))


def test_eval_output_check_leaves_no_folder(shared, tmp_path):
    from cdnv2.cli import eval as eval_cli

    root = shared[0]
    eval_cli.load(eval_cli.EvalConfig(checkpoint=str(root / "m.safetensors"), out=str(tmp_path / "a" / "b") + "/"))
    assert not (tmp_path / "a").exists()  # a later refusal (bad data=...) once left it behind
