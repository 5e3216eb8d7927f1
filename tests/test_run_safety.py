"""Run safety: run identity, never overwriting, one run per folder, signals.

The real commands run in subprocesses wherever the process matters (signals to the
process group with loader workers, two processes on one folder, Hydra's log file);
the rest runs in-process.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from cdnv2.engine import train
from cdnv2.engine.run_dir import LOCK_NAME, RESUMABLE_KEYS, RunDir
from cdnv2.errors import RunDirError

from helpers import BIN, QUICK, cli, load, quick_config

# A run long enough to be signalled while it trains (it never gets to finish).
LONG = ["data.num_train=8192", "data.num_val=64", "data.batch_size=32", "trainer.epochs=2",
        "trainer.log_every=1", "trainer.progress=lines", "trainer.threads=1"]


def _digest(run_dir: Path) -> dict[str, str]:
    """Content of every file a finished run wrote (not the launcher's log/config)."""
    out = {}
    for p in sorted(run_dir.rglob("*")):
        rel = str(p.relative_to(run_dir))
        if p.is_file() and not rel.startswith(".hydra") and rel not in ("train.log", LOCK_NAME):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _start(*args: str, name: str = "cdnv2-train") -> subprocess.Popen:
    return subprocess.Popen([str(BIN / name), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONHASHSEED": "0"})


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} early: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def _handles_sigterm(proc: subprocess.Popen) -> bool:
    """The command's own signal handling is installed (its start-up imports are done)."""
    status = Path(f"/proc/{proc.pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _logged_step(run_dir: Path, step: int):
    metrics = run_dir / "metrics.jsonl"
    return lambda: metrics.exists() and f'"step": {step},' in metrics.read_text()


def _assert_clean_stop(proc: subprocess.Popen, code: int, prog: str = "cdnv2-train") -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "interrupted by" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: "), err[-3000:]
    return err


@pytest.fixture(scope="module")
def finished(quick_cli_run) -> Path:
    """A finished QUICK run, shared with other modules (the tests copy it before changing anything)."""
    return quick_cli_run


# ----------------------------------------------------------------------------- items 1, 2, 8
@pytest.mark.ci
def test_finished_run_identity_never_destroy_and_aside(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _digest(run)

    # the same command again: "already finished", nothing re-run or rewritten
    r = cli("cdnv2-train", *QUICK, "trainer.threads=2", f"hydra.run.dir={run}")  # threads may change
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already finished" in r.stderr and "resumed" not in r.stderr and "eval" not in r.stderr
    assert "cdnv2-train summary" in r.stdout
    assert _digest(run) == before

    # other settings: exit 2 listing each difference and the ways forward, nothing touched
    r = cli("cdnv2-train", *QUICK, "optim.lr=0.3", "seed=1", f"hydra.run.dir={run}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "optim.lr: None -> 0.3" in r.stderr and "seed: 0 -> 1" in r.stderr
    assert "name=" in r.stderr and "resume=never" in r.stderr and "Traceback" not in r.stderr
    assert _digest(run) == before

    # both resumable checkpoints unreadable but outputs present: refuse, name them
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    for name in ("last.pt", "prev.pt"):
        (broken / "checkpoints" / name).write_bytes(b"not a checkpoint")
    kept = _digest(broken)
    r = cli("cdnv2-train", *QUICK, f"hydra.run.dir={broken}")
    assert r.returncode == 2, r.stderr[-2000:]
    for name in ("checkpoints/best.pt", "model_compact.pt", "report.json"):
        assert name in r.stderr
    assert "resume=never" in r.stderr and "Traceback" not in r.stderr
    assert _digest(broken) == kept

    # resume=never: the old run moves aside whole; the new one starts with fresh logs
    r = cli("cdnv2-train", *QUICK, "trainer.epochs=1", "resume=never", f"hydra.run.dir={broken}")
    assert r.returncode == 0, r.stderr[-2000:]
    aside = tmp_path / "broken.old-1"
    assert f"aside to {aside}" in r.stderr
    assert _digest(aside) == kept
    assert (aside / "train.log").exists()  # its log went along; this run's log starts afresh
    assert "moved the earlier run" in (broken / "train.log").read_text()
    rows = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert max(row["epoch"] for row in rows) <= 1.0 and rows[0]["step"] == 1
    assert json.loads((broken / "report.json").read_text())["epochs"] == 1


def _image_folder(root: Path, classes: list[str], per_class: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for split in ("train", "val"):
        for i, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(per_class):
                pixels = (torch.rand(16, 16, 3, generator=g) * 60 + 40 * i).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(d / f"{k}.png")


def test_identity_change_of_data_root_is_refused(tmp_path):
    classes = ["ant", "bee", "cat", "dog"]
    _image_folder(tmp_path / "A", classes, 8, seed=0)
    _image_folder(tmp_path / "B", classes, 8, seed=1)  # same names and sizes, other images

    def config(root):
        cfg = quick_config()
        cfg.trainer.epochs = 1
        cfg.data.name, cfg.data.root, cfg.data.batch_size, cfg.data.image_size = "imagefolder", str(root), 8, 16
        return cfg

    train(config(tmp_path / "A"), tmp_path / "run")
    before = _digest(tmp_path / "run")
    with pytest.raises(RunDirError) as e:
        train(config(tmp_path / "B"), tmp_path / "run")
    msg = str(e.value)
    assert f"data root: '{tmp_path / 'A'}' -> '{tmp_path / 'B'}'" in msg
    assert "name=" in msg and "resume=never" in msg
    assert _digest(tmp_path / "run") == before
    # a different path to the same folder is the same data: finished, untouched
    link = tmp_path / "A-link"
    link.symlink_to(tmp_path / "A")
    train(config(link), tmp_path / "run")
    assert _digest(tmp_path / "run") == before


def test_resumable_keys_are_documented():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for key in RESUMABLE_KEYS:
        assert f"`{key}`" in readme, key


# ----------------------------------------------------------------------------- item 3
_HOLD = "import sys, time; from cdnv2.engine.run_dir import RunDir; r = RunDir(sys.argv[1]); print('held', flush=True); time.sleep(600)"


@pytest.mark.ci
def test_one_process_per_folder_and_dead_holders_never_block(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # a second process on the folder: exit 2 naming the holder, nothing written
        r = cli("cdnv2-train", *QUICK, f"hydra.run.dir={run}")
        assert r.returncode == 2, r.stderr[-2000:]
        assert f"in use by another process (pid {holder.pid} on host " in r.stderr
        assert "Traceback" not in r.stderr and not (run / "checkpoints").exists()
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            RunDir(run)
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock
        holder.wait()
    # stale temporaries are removed by the next owner, under its lock
    (run / "checkpoints").mkdir()
    stale = run / "checkpoints" / ".last.pt.tmp-999999"
    stale.write_bytes(b"partial")
    with RunDir(run):
        assert not stale.exists()
        with pytest.raises(RunDirError, match="already in use by this process"):
            RunDir(run)
    RunDir(run).close()  # released


# ----------------------------------------------------------------------------- item 4
@pytest.mark.ci
def test_sigterm_to_the_process_group_with_workers(tmp_path):
    """What `timeout`, SLURM and Kubernetes do: every process of the group gets SIGTERM."""
    run = tmp_path / "run"
    proc = _start(*LONG, "data.num_workers=2", f"hydra.run.dir={run}")
    _wait_for(_logged_step(run, 3), proc)
    os.killpg(proc.pid, signal.SIGTERM)
    err = _assert_clean_stop(proc, 143)
    assert "re-run the same command to resume" in err
    state = load(run / "checkpoints/last.pt")
    assert state["step"] >= 3 and state["batch_in_epoch"] == state["step"]


@pytest.mark.slow
def test_ctrl_c_with_four_workers_and_a_second_ctrl_c(tmp_path):
    run = tmp_path / "run"
    proc = _start(*LONG, "data.num_workers=4", f"hydra.run.dir={run}")
    _wait_for(_logged_step(run, 2), proc)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C
    _assert_clean_stop(proc, 130)
    step = load(run / "checkpoints/last.pt")["step"]
    assert step >= 2

    # resumed; a second Ctrl-C while the first one is being handled exits at once
    big = [a for a in LONG if not a.startswith("data.batch_size")] + ["data.batch_size=512"]
    proc = _start(*big, "data.num_workers=0", f"hydra.run.dir={tmp_path / 'big'}")
    _wait_for(_logged_step(tmp_path / "big", 1), proc)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    if "second SIGINT" in err:  # the usual case: the step was still running
        assert proc.returncode == 130 and "Traceback" not in err
        ckpts = tmp_path / "big" / "checkpoints"
        assert not (ckpts / "last.pt").exists() or load(ckpts / "last.pt")["step"] >= 1
        assert not (ckpts / "prev.pt").exists()
    else:  # the save finished before the second signal arrived
        assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["start-up", "evaluation"])
def test_signals_outside_training_steps(tmp_path, phase):
    run = tmp_path / "run"
    if phase == "start-up":
        proc = _start(*LONG, f"hydra.run.dir={run}")
        _wait_for(lambda: _handles_sigterm(proc), proc)
        proc.send_signal(signal.SIGTERM)
        _assert_clean_stop(proc, 143)
        assert not (run / "checkpoints" / "last.pt").exists()
    else:  # two steps, then a long evaluation
        proc = _start(*LONG, "trainer.max_steps_per_epoch=2", "data.num_val=6000", "data.num_workers=2",
                      f"hydra.run.dir={run}")
        _wait_for(_logged_step(run, 2), proc)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _assert_clean_stop(proc, 130)
        state = load(run / "checkpoints/last.pt")
        assert state["step"] == 2 and state["epoch"] == 0 and state["batch_in_epoch"] == 2


@pytest.mark.slow
def test_other_commands_exit_130_on_ctrl_c(tmp_path, finished):
    ckpt = str(finished / "checkpoints/last.pt")
    for prog, args in [("cdnv2-eval", [f"checkpoint={ckpt}", "data.num_val=20000"]),
                       ("cdnv2-convert", [f"checkpoint={ckpt}", "bench_seconds=60", f"out={tmp_path / 'c.pt'}"])]:
        proc = _start(*args, name=prog)
        _wait_for(lambda: _handles_sigterm(proc), proc)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        _assert_clean_stop(proc, 130, prog)


@pytest.mark.slow  # three real commands under reduced privileges (~20 s)
def test_read_only_folders_are_clear_errors(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run, ignore=shutil.ignore_patterns("model_compact*", "report.json"))
    for p in [run, *run.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: drop that privilege for the commands
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    try:
        for prog, args in [("cdnv2-train", [*QUICK, f"hydra.run.dir={run}"]),
                           ("cdnv2-convert", [f"checkpoint={run}/checkpoints/last.pt", "bench=false"]),
                           ("cdnv2-viz", [f"run_dir={run}"])]:
            r = subprocess.run([*prefix, str(BIN / prog), *args], capture_output=True, text=True, timeout=300)
            assert r.returncode == 2, (prog, r.stderr[-2000:])
            assert "not writable" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    finally:
        for p in [run, *run.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)


@pytest.mark.slow
def test_a_killed_loader_worker_is_a_clear_error(tmp_path):
    """The OOM killer picks a worker: one paragraph, exit 2, the last checkpoint intact."""
    run = tmp_path / "run"
    proc = _start(*LONG, "data.num_workers=2", "trainer.max_steps_per_epoch=3", f"hydra.run.dir={run}")
    _wait_for(_logged_step(run, 5), proc)  # epoch 2: last.pt of step 3 exists
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    os.kill(int(children[0]), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "is killed by signal" in err and "data.num_workers" in err
    assert load(run / "checkpoints/last.pt")["step"] == 3
