"""Crash safety: kills, interrupted writes, signals, bad checkpoints, full disks, NaNs."""
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cdnv2.engine import train
from cdnv2.errors import CheckpointError, NonFiniteLossError

from helpers import BIN, QUICK, assert_same_state, cli, load
from test_train import quick_config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted QUICK run: the weights every interrupted run must end with."""
    d = tmp_path_factory.mktemp("ref")
    r = cli("cdnv2-train", *QUICK, f"hydra.run.dir={d}")
    assert r.returncode == 0, r.stderr[-2000:]
    return load(d / "checkpoints/last.pt")


def _finish_and_compare(run_dir: Path, reference: dict, *extra: str) -> subprocess.CompletedProcess:
    r = cli("cdnv2-train", *QUICK, *extra, f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    final = load(run_dir / "checkpoints/last.pt")
    assert final["step"] == reference["step"]
    assert_same_state(final["model_state"], reference["model_state"])
    return r


def test_kill_after_compact_switch_resumes_exactly(tmp_path, reference):
    # step 10: the newest checkpoint (step 8) already holds compact training layers
    r = cli("cdnv2-train", *QUICK, f"hydra.run.dir={tmp_path}", env={"CDNV2_TEST_KILL_AT_STEP": "10"})
    assert r.returncode == -signal.SIGKILL
    assert load(tmp_path / "checkpoints/last.pt")["structure"] == "compact_train"
    _finish_and_compare(tmp_path, reference)


def test_kill_with_two_data_workers_resumes_exactly(tmp_path, reference):
    r = cli("cdnv2-train", *QUICK, "data.num_workers=2", f"hydra.run.dir={tmp_path}",
            env={"CDNV2_TEST_KILL_AT_STEP": "7"})
    assert r.returncode == -signal.SIGKILL
    _finish_and_compare(tmp_path, reference, "data.num_workers=2")


def test_kill_at_a_random_moment_resumes_exactly(tmp_path, reference):
    """Timing-based: SIGKILL from outside once the first checkpoint exists."""
    exe = BIN / "cdnv2-train"
    proc = subprocess.Popen([str(exe), *QUICK, f"hydra.run.dir={tmp_path}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints/last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    _finish_and_compare(tmp_path, reference)


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, reference):
    # die half-way through the second write of last.pt (end of epoch 2)
    r = cli("cdnv2-train", *QUICK, f"hydra.run.dir={tmp_path}",
            env={"CDNV2_TEST_KILL_DURING_SAVE": "last.pt@2"})
    assert r.returncode == -signal.SIGKILL
    ckpts = tmp_path / "checkpoints"
    stale = list(ckpts.glob(".last.pt.tmp-*"))
    assert stale, "the partial temporary file should be left behind by the kill"
    assert load(ckpts / "last.pt")["step"] == 4  # the previous checkpoint is intact
    r = _finish_and_compare(tmp_path, reference)
    assert not list(ckpts.glob(".*.tmp-*")), "stale temporaries are cleaned up"
    assert "removed stale temporary checkpoint" in r.stderr


def test_sigterm_checkpoints_and_exits_143_then_resumes(tmp_path, reference):
    exe = BIN / "cdnv2-train"
    env = {**os.environ, "CDNV2_TEST_STEP_SLEEP": "0.5"}
    proc = subprocess.Popen([str(exe), *QUICK, f"hydra.run.dir={tmp_path}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    metrics = tmp_path / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"step": 2' in line for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "re-run the same command to resume" in err
    state = load(tmp_path / "checkpoints/last.pt")
    assert 0 < state["batch_in_epoch"] < 4 or state["step"] % 4 == 0  # written where it stopped
    _finish_and_compare(tmp_path, reference)


def test_bad_checkpoint_files_give_clear_errors(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(os.urandom(1000))
    torch.save([1, 2, 3], tmp_path / "foreign.pt")
    for name, text in [("empty.pt", "is empty"), ("junk.pt", "cannot be read"),
                       ("foreign.pt", "is not a cdnv2 checkpoint"), ("missing.pt", "no such file")]:
        r = cli("cdnv2-train", *QUICK, f"resume={tmp_path / name}", f"hydra.run.dir={tmp_path / 'run'}")
        assert r.returncode == 2, (name, r.stderr[-1500:])
        assert text in r.stderr and name in r.stderr and "Traceback" not in r.stderr


def test_resume_auto_falls_back_to_previous_checkpoint(tmp_path, reference):
    r = cli("cdnv2-train", *QUICK, f"hydra.run.dir={tmp_path}", env={"CDNV2_TEST_KILL_AT_STEP": "9"})
    assert r.returncode == -signal.SIGKILL
    last = tmp_path / "checkpoints/last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # truncated
    r = _finish_and_compare(tmp_path, reference)
    assert "falling back to the previous checkpoint" in r.stderr


def test_disk_full_while_saving_is_clear_and_keeps_previous(tmp_path):
    r = cli("cdnv2-train", *QUICK, f"hydra.run.dir={tmp_path}", env={"CDNV2_TEST_KILL_AT_STEP": "5"})
    assert r.returncode == -signal.SIGKILL
    size = (tmp_path / "checkpoints/last.pt").stat().st_size
    limit = size // 4  # no checkpoint fits any more (masked or compact); logs and metrics do

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    exe = BIN / "cdnv2-train"
    r = subprocess.run([str(exe), *QUICK, f"hydra.run.dir={tmp_path}"], preexec_fn=small_files,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "could not write checkpoint" in r.stderr and "File too large" in r.stderr
    assert "Traceback" not in r.stderr
    assert load(tmp_path / "checkpoints/last.pt")["step"] == 4
    assert not list((tmp_path / "checkpoints").glob(".*.tmp-*"))


def test_non_finite_loss_raise_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("CDNV2_TEST_NAN_AT_STEP", "6")
    with pytest.raises(NonFiniteLossError) as e:
        train(quick_config(), tmp_path)
    msg = str(e.value)
    assert "step 6" in msg and "epoch 2" in msg and "lr" in msg and "last.pt" in msg
    state = load(tmp_path / "checkpoints/last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())


def test_non_finite_loss_skip_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("CDNV2_TEST_NAN_AT_STEP", "3")
    report = train(quick_config(nan_policy="skip"), tmp_path)
    state = load(tmp_path / "checkpoints/last.pt")
    assert state["bad_steps"] == 1 and report["steps"] == 12
    with pytest.raises(NonFiniteLossError, match="max_bad_steps=0"):
        train(quick_config(nan_policy="skip", max_bad_steps=0), tmp_path / "again")


def test_checkpoint_of_another_model_lists_differences(tmp_path):
    train(quick_config(), tmp_path / "a")
    cfg = quick_config()
    cfg.model.name = "condensenet_50"
    cfg.resume = str(tmp_path / "a/checkpoints/last.pt")
    with pytest.raises(CheckpointError) as e:
        train(cfg, tmp_path / "b")
    assert "model 'cdnv2_tiny' vs 'condensenet_50'" in str(e.value)
    state = load(tmp_path / "a/checkpoints/last.pt")
    state["class_names"] = ["x"] * 3 + state["class_names"][3:]
    torch.save(state, tmp_path / "renamed.pt")
    cfg = quick_config()
    cfg.resume = str(tmp_path / "renamed.pt")
    with pytest.raises(CheckpointError, match="first differences: 'x'/'circle'"):
        train(cfg, tmp_path / "c")


def _torchrun(*args, env=None, timeout=600):
    torchrun = shutil.which("torchrun", path=str(BIN)) or str(BIN / "torchrun")
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def test_torchrun_two_gloo_processes(tmp_path):
    r = _torchrun("--no-python", str(BIN / "cdnv2-train"), *QUICK, f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["masks_identical_across_ranks"] is True
    assert report["samples"] == 128  # every validation sample counted once
    assert len(list(tmp_path.parent.glob(tmp_path.name + "*"))) == 1


def test_torchrun_restarts_after_a_rank_dies(tmp_path):
    once = tmp_path / "died-once"
    r = _torchrun("--max-restarts=1", "--no-python", str(BIN / "cdnv2-train"), *QUICK,
                  f"hydra.run.dir={tmp_path / 'run'}",
                  env={"CDNV2_TEST_KILL_AT_STEP": "6", "CDNV2_TEST_KILL_RANK": "1", "CDNV2_TEST_KILL_ONCE": str(once)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert once.exists()
    assert json.loads((tmp_path / "run/report.json").read_text())["steps"] == 12
