"""Crash safety: kills, interrupted writes, signals, bad checkpoints, full disks, NaNs.

Faults are injected with trainer callbacks (tests/fault_injection.py): in-process, a
"crash" is an exception after step N (nothing after it runs, as after a kill); the real
command is killed with SIGKILL through the ``callbacks`` config key.
"""
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
from cdnv2.errors import CheckpointError, NonFiniteLossError, TrainingInterrupted

from fault_injection import Crash, CrashAtStep, NanLossAtStep, SignalAtStep
from helpers import (BIN, QUICK, assert_same_state, callback, cli, command_env, load, quick_config,
                     restored_process_state, run_like_cli)


@pytest.fixture(scope="module")
def reference(quick_cli_run):
    """An uninterrupted QUICK run: the weights every interrupted run must end with."""
    return load(quick_cli_run / "checkpoints/last.pt")


def _compare(run_dir: Path, reference: dict) -> None:
    final = load(run_dir / "checkpoints/last.pt")
    assert final["step"] == reference["step"]
    assert_same_state(final["model_state"], reference["model_state"])


def _crash_then_finish(run_dir: Path, reference: dict, step: int, *extra: str) -> None:
    with pytest.raises(Crash):
        run_like_cli(run_dir, *QUICK, *extra, callbacks=[CrashAtStep(step)])
    run_like_cli(run_dir, *QUICK, *extra)
    _compare(run_dir, reference)


def _finish_with_command(run_dir: Path, reference: dict, *extra: str) -> subprocess.CompletedProcess:
    r = cli("cdnv2-train", *QUICK, *extra, f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-2000:]
    _compare(run_dir, reference)
    return r


@pytest.mark.ci
def test_kill_during_checkpoint_write_keeps_previous(tmp_path, reference):
    """The real command, SIGKILLed half-way through writing last.pt, then re-run."""
    # die half-way through the second write of last.pt (end of epoch 2)
    r = cli("cdnv2-train", *QUICK, f"hydra.run.dir={tmp_path}", callback("kill", "KillDuringSave", nth=2))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    ckpts = tmp_path / "checkpoints"
    stale = list(ckpts.glob(".last.pt.tmp-*"))
    assert stale, "the partial temporary file should be left behind by the kill"
    assert load(ckpts / "last.pt")["step"] == 4  # the previous checkpoint is intact
    r = _finish_with_command(tmp_path, reference)
    assert not list(ckpts.glob(".*.tmp-*")), "stale temporaries are cleaned up"
    assert "removed stale temporary checkpoint" in r.stderr
    assert "resumed from" in r.stderr + r.stdout and "cdnv2-train summary" in r.stdout


def test_crash_after_compact_switch_resumes_exactly(tmp_path, reference):
    # step 10: the newest checkpoint (step 8) already holds compact training layers
    with pytest.raises(Crash):
        run_like_cli(tmp_path, *QUICK, callbacks=[CrashAtStep(10)])
    assert load(tmp_path / "checkpoints/last.pt")["structure"] == "compact_train"
    run_like_cli(tmp_path, *QUICK)
    _compare(tmp_path, reference)


def test_crash_with_two_data_workers_resumes_exactly(tmp_path, reference):
    _crash_then_finish(tmp_path, reference, 7, "data.num_workers=2")


def test_sigterm_checkpoints_where_it_stopped_then_resumes(tmp_path, reference):
    with pytest.raises(TrainingInterrupted) as e:
        run_like_cli(tmp_path, *QUICK, callbacks=[SignalAtStep(2, signal.SIGTERM)])
    assert e.value.exit_code == 143 and e.value.checkpoint.endswith("last.pt")
    state = load(tmp_path / "checkpoints/last.pt")
    assert state["step"] == 2 and state["batch_in_epoch"] == 2  # mid-epoch, where it stopped
    run_like_cli(tmp_path, *QUICK)
    _compare(tmp_path, reference)


def test_resume_auto_falls_back_to_previous_checkpoint(tmp_path, reference, caplog):
    with pytest.raises(Crash):
        run_like_cli(tmp_path, *QUICK, callbacks=[CrashAtStep(9)])
    last = tmp_path / "checkpoints/last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3])  # truncated
    # prev.pt holds step 4: condensation stage 3 (step 6) and the switch to compact
    # training happen again after the resume.
    run_like_cli(tmp_path, *QUICK)
    _compare(tmp_path, reference)
    assert "falling back to the previous checkpoint" in caplog.text
    # the unreadable file was kept aside, never rotated over the good prev.pt
    assert (tmp_path / "checkpoints/last.pt.unreadable").read_bytes() == data[: len(data) // 3]
    assert load(tmp_path / "checkpoints/prev.pt")["step"] > 4


def test_bad_checkpoint_files_give_clear_errors(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(os.urandom(1000))
    torch.save([1, 2, 3], tmp_path / "foreign.pt")
    for name, text in [("empty.pt", "is empty"), ("junk.pt", "cannot be read"),
                       ("foreign.pt", "is not a cdnv2 checkpoint"), ("missing.pt", "no such file")]:
        cfg = quick_config()
        cfg.resume = str(tmp_path / name)
        with pytest.raises(CheckpointError) as e:
            train(cfg, tmp_path / "run")
        assert text in str(e.value) and name in str(e.value)
    # the command's error path (in-process: a real start costs seconds): one paragraph, exit 2
    from cdnv2.cli.common import run_user_command
    from cdnv2.cli.train import compose_train_config, run_command

    cfg = compose_train_config([*QUICK, f"resume={tmp_path / 'junk.pt'}"])
    with restored_process_state(), pytest.raises(SystemExit) as e:
        run_user_command("cdnv2-train", lambda: run_command(cfg, str(tmp_path / "run")))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"cdnv2-train: error: {tmp_path / 'junk.pt'}"), err[-1500:]
    assert "cannot be read" in err and len(err.strip().splitlines()) == 1


@pytest.mark.ci
def test_disk_full_while_saving_is_clear_and_keeps_previous(tmp_path):
    with pytest.raises(Crash):
        run_like_cli(tmp_path, *QUICK, callbacks=[CrashAtStep(5)])
    size = (tmp_path / "checkpoints/last.pt").stat().st_size
    limit = size // 4  # no checkpoint fits any more (masked or compact); logs and metrics do

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    exe = BIN / "cdnv2-train"
    r = subprocess.run([str(exe), *QUICK, f"hydra.run.dir={tmp_path}"], preexec_fn=small_files,
                       capture_output=True, text=True, timeout=600, env=command_env())
    assert r.returncode == 2, r.stderr[-2000:]
    assert "could not write checkpoint" in r.stderr and "File too large" in r.stderr
    assert "Traceback" not in r.stderr
    assert load(tmp_path / "checkpoints/last.pt")["step"] == 4
    assert not list((tmp_path / "checkpoints").glob(".*.tmp-*"))


def test_non_finite_loss_raise_policy(tmp_path):
    with pytest.raises(NonFiniteLossError) as e:
        train(quick_config(), tmp_path, callbacks=[NanLossAtStep(6)])
    msg = str(e.value)
    assert "step 6" in msg and "epoch 2" in msg and "lr" in msg and "last.pt" in msg
    state = load(tmp_path / "checkpoints/last.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model_state"].values() if v.is_floating_point())


def test_non_finite_loss_skip_policy(tmp_path):
    report = train(quick_config(nan_policy="skip"), tmp_path, callbacks=[NanLossAtStep(3)])
    state = load(tmp_path / "checkpoints/last.pt")
    assert state["bad_steps"] == 1 and report["steps"] == 12
    with pytest.raises(NonFiniteLossError, match="max_bad_steps=0"):
        train(quick_config(nan_policy="skip", max_bad_steps=0), tmp_path / "again", callbacks=[NanLossAtStep(3)])


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


# ----------------------------------------------------------------------------- real processes
@pytest.mark.slow
def test_kill_at_a_random_moment_resumes_exactly(tmp_path, reference):
    """Timing-based: SIGKILL from outside once the first checkpoint exists."""
    proc = subprocess.Popen([str(BIN / "cdnv2-train"), *QUICK, f"hydra.run.dir={tmp_path}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=command_env())
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints/last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    _finish_with_command(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_to_the_command_exits_143_then_resumes(tmp_path, reference):
    proc = subprocess.Popen([str(BIN / "cdnv2-train"), *QUICK, f"hydra.run.dir={tmp_path}",
                             callback("sleep", "SlowSteps", seconds=0.5)], env=command_env(),
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
    _finish_with_command(tmp_path, reference)


def _torchrun(*args, timeout=600):
    torchrun = shutil.which("torchrun", path=str(BIN)) or str(BIN / "torchrun")
    return subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", *args],
        capture_output=True, text=True, timeout=timeout, env=command_env(),
    )


@pytest.mark.ci
def test_torchrun_two_gloo_processes(tmp_path):
    r = _torchrun("--no-python", str(BIN / "cdnv2-train"), *QUICK, f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["masks_identical_across_ranks"] is True
    assert report["samples"] == 128  # every validation sample counted once
    assert len(list(tmp_path.parent.glob(tmp_path.name + "*"))) == 1


@pytest.mark.slow
def test_torchrun_restarts_after_a_rank_dies(tmp_path):
    once = tmp_path / "died-once"
    r = _torchrun("--max-restarts=1", "--no-python", str(BIN / "cdnv2-train"), *QUICK,
                  f"hydra.run.dir={tmp_path / 'run'}",
                  callback("kill", "KillAtStep", step=6, rank=1, once=str(once)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert once.exists()
    assert json.loads((tmp_path / "run/report.json").read_text())["steps"] == 12
