"""The run folder belongs to its run: nothing else in it is moved or replaced, and nothing
is written into it before the checks pass (docs/run_safety.md, "What cdnv2 writes and where").

The real commands run in subprocesses (Hydra's record and log file, exit codes); the
faults come from tests/fault_injection.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdnv2.engine.run_dir import LOCK_NAME

from helpers import BIN, QUICK, assert_same_state, callback, cli, command_env, load


def _tree(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under ``folder`` (the launcher's record and log included) and its content."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip
    }


def _train(run: Path, *args: str) -> subprocess.CompletedProcess:
    return cli("cdnv2-train", *QUICK, *args, f"hydra.run.dir={run}")


@pytest.fixture(scope="module")
def finished(quick_cli_run) -> Path:
    """A finished QUICK run, the session's shared one (tests copy it before changing anything)."""
    return quick_cli_run


@pytest.mark.ci
def test_a_folder_with_other_files_is_refused_and_never_moved(tmp_path):
    proj = tmp_path / "proj"
    (proj / ".git").mkdir(parents=True)
    (proj / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (proj / "notes.txt").write_text("mine\n")
    before = _tree(proj)
    r = _train(proj)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{proj} is not a cdnv2 run directory" in r.stderr
    assert ".git/" in r.stderr and "notes.txt" in r.stderr and "Traceback" not in r.stderr
    assert _tree(proj) == before and sorted(os.listdir(proj)) == [".git", "notes.txt"]  # no lock, .hydra, log

    # A run folder (marked by its lock) that also holds the user's files, killed before its
    # first checkpoint: the re-run moves the run's logs aside, never the user's files.
    run = tmp_path / "run"
    r = _train(run, callback("kill", "KillAtStep", step=2))
    assert r.returncode == -9, r.stderr[-2000:]
    (run / ".git").mkdir()
    (run / "notes.txt").write_text("mine\n")
    r = _train(run, callback("kill", "KillAtStep", step=1))  # moving aside happens before step 1
    assert r.returncode == -9, r.stderr[-2000:]
    aside = tmp_path / "run.old-1"
    assert (aside / "metrics.jsonl").exists() and (aside / "train.log").exists()
    assert not (aside / "notes.txt").exists() and not (aside / ".git").exists()
    assert (run / "notes.txt").read_text() == "mine\n" and (run / ".git").is_dir()


_HOLD = ("import sys, time; from cdnv2.engine.run_dir import RunDir; r = RunDir(sys.argv[1]); "
         "print('held', flush=True); time.sleep(600)")


def _with_identity(src: Path, dst: Path, **changes) -> None:
    """A copy of run ``src`` whose checkpoints record other settings (another run)."""
    shutil.copytree(src, dst)
    for name in ("last.pt", "prev.pt"):
        state = load(dst / "checkpoints" / name)
        state["run_identity"]["config"].update(changes)
        torch.save(state, dst / "checkpoints" / name)


@pytest.mark.slow  # five real commands (~40 s)
def test_refused_and_failed_commands_leave_the_folder_as_it_was(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _tree(run, skip=(LOCK_NAME,))

    # other settings: refused with the difference; .hydra/ and train.log untouched
    r = _train(run, "optim.lr=0.2")
    assert r.returncode == 2 and "optim.lr: None -> 0.2" in r.stderr, r.stderr[-2000:]
    assert _tree(run, skip=(LOCK_NAME,)) == before

    # the folder is locked by another process: refused, its record untouched
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                              env=command_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        r = _train(run)
        assert r.returncode == 2 and "in use by another process" in r.stderr, r.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()
    assert _tree(run, skip=(LOCK_NAME,)) == before

    # resume=PATH (a checkpoint with this command's settings) into a folder holding another run
    other = tmp_path / "other"
    _with_identity(finished, other, **{"optim.lr": 0.2})
    kept = _tree(other, skip=(LOCK_NAME,))
    r = _train(other, f"resume={run}/checkpoints/prev.pt")
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"{other}/checkpoints/last.pt belongs to a run with other settings" in r.stderr
    assert "optim.lr: 0.2 -> None" in r.stderr and "Traceback" not in r.stderr
    assert _tree(other, skip=(LOCK_NAME,)) == kept

    # a failure after start-up (resume= names no checkpoint) in a new folder: nothing left
    new = tmp_path / "new" / "run"
    r = _train(new, f"resume={run}/report.json")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "new").exists()

    # resume=never: the old run moves aside with its own record; the new one writes its own
    r = _train(run, "resume=never", callback("kill", "KillAtStep", step=1))
    assert r.returncode == -9, r.stderr[-2000:]
    assert _tree(tmp_path / "run.old-1") == before  # .hydra/, train.log and all
    assert "resume=never" in (run / ".hydra" / "overrides.yaml").read_text()


@pytest.mark.ci
def test_a_finished_run_with_an_unreadable_last_pt_stays_finished(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    before = _tree(run, skip=(LOCK_NAME,))
    r = _train(run)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already finished" in r.stderr and "last.pt is unreadable" in r.stderr
    assert "resumed" not in r.stderr and "epoch 3/3" not in r.stderr
    assert _tree(run, skip=(LOCK_NAME,)) == before  # prev.pt, metrics, outputs, record: all as they were


def test_other_commands_never_replace_a_runs_files(tmp_path, finished, capsys):
    # The commands' own error path, in-process (each real command start costs seconds).
    from cdnv2.cli.common import run_user_command
    from cdnv2.cli.convert import ConvertConfig, run as convert
    from cdnv2.cli.eval import EvalConfig, run as evaluate
    from cdnv2.cli.viz import VizConfig, run as viz
    from cdnv2.errors import CheckpointError, RunDirError

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = _tree(run, skip=(LOCK_NAME,))
    for prog, task, message in [
        ("cdnv2-convert", lambda: convert(ConvertConfig(checkpoint=f"{run}/checkpoints/last.pt",
                                                        out=f"{run}/checkpoints/best.pt", bench=False)),
         "would replace checkpoints/best.pt"),
        ("cdnv2-eval", lambda: evaluate(EvalConfig(checkpoint=f"{run}/model_compact.pt", out=f"{run}/report.json",
                                                   progress="none")),
         "would replace report.json"),
    ]:
        with pytest.raises(SystemExit) as e:
            run_user_command(prog, task, (CheckpointError,))
        out, err = capsys.readouterr()
        assert e.value.code == 2 and err.startswith(f"{prog}: error: ") and message in err, err[-2000:]
        assert "top-1" not in out  # refused before evaluating
    with pytest.raises(RunDirError, match=r"would replace tb/curves.png"):
        viz(VizConfig(run_dir=str(run), out=str(run / "tb")))
    assert _tree(run, skip=(LOCK_NAME,)) == before


@pytest.mark.parametrize("fault", [
    pytest.param("full disk writing best.pt", marks=pytest.mark.ci),
    pytest.param("killed after last.pt", marks=pytest.mark.slow),
])
def test_best_and_last_agree_after_a_failed_write(tmp_path, finished, fault):
    """The re-run ends with the best.pt and best_top1 of an uninterrupted run."""
    ref = load(finished / "checkpoints" / "best.pt")
    epoch = ref["epoch"]
    run = tmp_path / "run"
    if fault.startswith("full disk"):
        r = _train(run, callback("fault", "FailWrite", file="best.pt", epoch=epoch))
        assert r.returncode == 2 and "No space left on device" in r.stderr, r.stderr[-2000:]
    else:
        r = _train(run, callback("fault", "KillAfterWrite", file="last.pt", epoch=epoch))
        assert r.returncode == -9, r.stderr[-2000:]
    r = _train(run)
    assert r.returncode == 0, r.stderr[-2000:]
    best = load(run / "checkpoints" / "best.pt")
    assert (best["epoch"], best["best_top1"]) == (epoch, ref["best_top1"])
    assert_same_state(best["model_state"], ref["model_state"])
    report = json.loads((run / "report.json").read_text())
    assert report["best_top1"] == json.loads((finished / "report.json").read_text())["best_top1"]


@pytest.mark.slow  # a real command under reduced privileges
def test_eval_checks_its_output_place_first(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    ckpts = run / "checkpoints"
    ckpts.chmod(0o555)
    prefix = []
    if os.geteuid() == 0:  # root writes anywhere: drop that privilege for the command
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    try:
        r = subprocess.run([*prefix, str(BIN / "cdnv2-eval"), f"checkpoint={ckpts}/last.pt"],
                           capture_output=True, text=True, timeout=300, env=command_env())
    finally:
        ckpts.chmod(0o755)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"output folder {ckpts} is not writable" in r.stderr and "out=" in r.stderr
    assert "top-1" not in r.stdout and "Traceback" not in r.stderr


def test_eval_prints_its_result_when_the_late_write_fails(tmp_path, finished, monkeypatch, capsys):
    from cdnv2.cli.eval import EvalConfig, run
    from cdnv2.errors import ConfigError

    real = Path.write_text

    def full_disk(self, *args, **kwargs):
        if self.name == "eval.json":
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(ConfigError, match="No space left on device"):
        run(EvalConfig(checkpoint=str(finished / "model_compact.pt"), out=str(tmp_path / "eval.json"),
                       progress="none"))
    out = capsys.readouterr().out
    assert "top-1 / top-5" in out and "not written" in out
