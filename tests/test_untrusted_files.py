"""Files a user downloads run no code: CIFAR batches are parsed as plain data, checkpoints
load only tensors and plain data, and a checkpoint's recorded data folder is read the
same safe way by every command."""
import pickle
import re

import numpy as np
import pytest
import torch

from cdnv2.checkpoint import read_file
from cdnv2.data import DataConfig, DataError, build_data
from cdnv2.safe_pickle import ForbiddenGlobal, load_plain_data
from cdnv2.engine import TrainConfig, TrainerConfig, configure_runtime, train
from cdnv2.errors import CheckpointError

from helpers import TouchOnUnpickle, cli, dump_like_python2, restored_process_state, write_cifar10

EVIL_GLOBAL = r"(posix|os)\.system"


def _dump(protocol):
    def dump(obj, path):
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=protocol)
    return dump


@pytest.mark.parametrize("dump", [dump_like_python2, _dump(2), _dump(4), _dump(5)],
                         ids=["python2", "protocol2", "protocol4", "protocol5"])
def test_cifar_batches_as_written_by_python2_and_3_are_read(tmp_path, dump):
    root = write_cifar10(tmp_path, n=6, dump=dump)
    data = build_data(DataConfig(name="cifar10", root=str(root), batch_size=4), seed=0)
    assert data.num_classes == 10 and data.class_names[:2] == ["c10_0", "c10_1"]
    assert len(data.val_loader.dataset) == 6


@pytest.mark.parametrize("dump", [dump_like_python2, _dump(4)], ids=["python2", "protocol4"])
def test_a_pickled_callable_is_refused_before_it_runs(tmp_path, dump):
    marker = tmp_path / "pwned"
    root = write_cifar10(tmp_path / "data", evil=TouchOnUnpickle(marker), dump=dump)
    with pytest.raises(DataError, match=rf"data_batch_1 is not a CIFAR-10 file: unpickling it would call {EVIL_GLOBAL}"):
        build_data(DataConfig(name="cifar10", root=str(root)), seed=0)
    assert not marker.exists()


@pytest.mark.parametrize("obj, global_name", [
    (pickle.loads, "_pickle.loads"), (eval, "builtins.eval"), (open, "io.open"), (np.load, "numpy.load"),
])
def test_only_plain_data_globals_are_looked_up(tmp_path, obj, global_name):
    path = tmp_path / "f"
    with open(path, "wb") as f:
        pickle.dump({"x": obj}, f, protocol=4)
    with open(path, "rb") as f, pytest.raises(ForbiddenGlobal) as e:
        load_plain_data(f)
    assert e.value.name == global_name


@pytest.mark.parametrize("meta, match", [
    ([1, 2], "holds a list, not a dict"),
    ({b"num_vis": 3072}, r"has no 'label_names' entry \(its keys: num_vis\)"),
    ({b"label_names": 7}, "'label_names' is not a list of class names"),
])
def test_a_meta_file_that_is_not_cifar_is_a_data_error(tmp_path, meta, match):
    root = write_cifar10(tmp_path)
    dump_like_python2(meta, root / "cifar-10-batches-py" / "batches.meta")
    with pytest.raises(DataError, match=match):
        build_data(DataConfig(name="cifar10", root=str(root)), seed=0)


def test_malicious_cifar_folder_on_the_command_line(tmp_path):
    marker = tmp_path / "pwned"
    root = write_cifar10(tmp_path / "data", evil=TouchOnUnpickle(marker))
    r = cli("cdnv2-train", "data=cifar10", f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}",
            "trainer.threads=1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert str(root / "cifar-10-batches-py" / "data_batch_1") in r.stderr
    assert re.search(EVIL_GLOBAL, r.stderr)
    assert not marker.exists()


# ------------------------------------------------------- a checkpoint names the folder
@pytest.fixture(scope="module")
def evil_checkpoints(tmp_path_factory):
    """A tiny run's last.pt and model_compact.pt, re-saved (still plain data) to record a
    malicious CIFAR-10 folder as their data."""
    tmp = tmp_path_factory.mktemp("evil")
    marker = tmp / "pwned"
    root = write_cifar10(tmp / "data", evil=TouchOnUnpickle(marker))
    cfg = TrainConfig(data=DataConfig(num_train=64, num_val=32, batch_size=32))
    cfg.trainer = TrainerConfig(epochs=1, max_steps_per_epoch=2, parity_samples=4, progress="none", threads=1)
    with restored_process_state():
        configure_runtime("cpu", deterministic=cfg.trainer.deterministic, threads=1, seed=cfg.seed)
        train(cfg, tmp / "run")
    paths = []
    for name in ("checkpoints/last.pt", "model_compact.pt"):
        obj = torch.load(tmp / "run" / name, weights_only=True)
        data = {"name": "cifar10", "root": str(root), "download": True}
        if "config" in obj:
            obj["config"]["data"].update(data)
        else:
            obj["data"].update(data)
        paths.append(tmp / name.replace("/", "_"))
        torch.save(obj, paths[-1])
    return marker, root, paths


@pytest.mark.parametrize("which", [0, pytest.param(1, marks=pytest.mark.slow)], ids=["last.pt", "model_compact.pt"])
def test_eval_of_a_checkpoint_recording_a_malicious_data_folder(evil_checkpoints, tmp_path, which):
    marker, root, paths = evil_checkpoints
    r = cli("cdnv2-eval", f"checkpoint={paths[which]}", f"out={tmp_path}", "progress=none")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert "cifar-10-batches-py" in r.stderr and re.search(EVIL_GLOBAL, r.stderr)
    assert not marker.exists()


def test_a_recorded_data_config_never_downloads(evil_checkpoints):
    from cdnv2.checkpoint import open_checkpoint
    from cdnv2.cli.eval import resolve_data_config

    _, root, paths = evil_checkpoints
    cfg, source = resolve_data_config(open_checkpoint(paths[0]))
    assert (cfg.name, cfg.root, cfg.download, source) == ("cifar10", str(root), False, "checkpoint")
    cfg, _ = resolve_data_config(open_checkpoint(paths[0]), overrides={"download": True})
    assert cfg.download  # the user asked on the command line


@pytest.mark.slow
def test_int8_calibration_on_a_malicious_recorded_data_folder(evil_checkpoints, tmp_path):
    pytest.importorskip("onnxruntime")
    marker, root, paths = evil_checkpoints
    r = cli("cdnv2-convert", f"checkpoint={paths[1]}", f"out={tmp_path / 'm.pt'}", "export=onnx",
            "quantize=int8", "threads=1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and re.search(EVIL_GLOBAL, r.stderr)
    assert not marker.exists()


# ------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_a_raw_pickle_checkpoint_names_the_global_it_would_call(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"w": [1.0]}, "hook": TouchOnUnpickle(marker)}, f, protocol=protocol)
    with pytest.raises(CheckpointError, match=rf"unpickling it would call {EVIL_GLOBAL}"):
        read_file(path)
    assert not marker.exists()


def test_a_recorded_thread_count_is_used_only_when_this_machine_can():
    import os

    from cdnv2.cli.eval import _recorded_threads

    assert _recorded_threads(1) == 1
    for value in ("4", 10**9, 0, -1, True, None, 1.5):
        assert _recorded_threads(value) is None, value
    assert _recorded_threads(os.cpu_count()) == os.cpu_count()


def test_a_recorded_architecture_far_beyond_its_weights_is_not_allocated(evil_checkpoints, tmp_path):
    from cdnv2.checkpoint import open_checkpoint

    _, _, paths = evil_checkpoints
    obj = torch.load(paths[1], weights_only=True)
    obj["model_kwargs"]["growth"] = [100000, 100000, 100000]  # ~5e12 weights: terabytes
    torch.save(obj, tmp_path / "huge.pt")
    with pytest.raises(CheckpointError, match="recorded architecture has .* weights but the file stores"):
        open_checkpoint(tmp_path / "huge.pt")
    obj["model_kwargs"]["bottleneck"] = 10**20
    torch.save(obj, tmp_path / "overflow.pt")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "overflow.pt")
    assert "cannot build model" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.ci
def test_hydras_pickle_rerun_is_refused(tmp_path):
    """Hydra's --experimental-rerun would pickle.load the file it is given."""
    marker, path = tmp_path / "pwned", tmp_path / "config.pickle"
    path.write_bytes(pickle.dumps(TouchOnUnpickle(marker)))
    r = cli("cdnv2-eval", "--experimental-rerun", str(path))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--experimental-rerun" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists()
