"""Sweeps that finish and resume, cluster launcher presets, the Pareto search."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdnv2.cli import launchers, search, sweeps
from cdnv2.errors import ConfigError, UserError
from helpers import BIN, QUICK, callback, cli, command_env

SWEEP = [*QUICK, "trainer.epochs=2"]


def _summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- sweep folder names
def test_sweep_name_is_deterministic_and_ignores_order_and_launcher():
    a = sweeps.derive_sweep_name(["-m", "model=cdnv2_tiny,condensenet_50", "seed=1"])
    assert a == sweeps.derive_sweep_name(["seed=1", "--multirun", "model=cdnv2_tiny,condensenet_50",
                                          "hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    assert a == "model=cdnv2_tiny,condensenet_50_seed=1"
    assert sweeps.derive_sweep_name(["-m", "seed=1,2"]) != sweeps.derive_sweep_name(["-m", "seed=1,3"])
    search_name = sweeps.derive_sweep_name(["-m", "hydra/sweeper=pareto", "experiment=quick"])
    assert search_name == "pareto_experiment=quick" != sweeps.derive_sweep_name(["-m", "experiment=quick"])
    long = sweeps.derive_sweep_name(["-m", *QUICK])
    assert len(long) <= 80 and long != sweeps.derive_sweep_name(["-m", *QUICK, "seed=2"])
    assert "/" not in sweeps.derive_sweep_name(["-m", "data.root=/data/imagenet"])


def test_sweep_name_is_added_only_to_multiruns():
    assert sweeps.with_sweep_name(["seed=1"]) == ["seed=1"]
    assert sweeps.with_sweep_name(["-m", "seed=1,2"])[-1] == "sweep_name='seed=1,2'"
    assert sweeps.with_sweep_name(["-m", "sweep_name=mine"]) == ["-m", "sweep_name=mine"]
    with pytest.raises(UserError, match="plain folder name"):
        sweeps.with_sweep_name(["-m", "sweep_name=a/b"])


def test_missing_extra_names_the_pip_command(monkeypatch, capsys):
    from cdnv2.cli import train as train_cli

    monkeypatch.setattr(sweeps.importlib.util, "find_spec", lambda name, *a: None)
    for option, extra in (("hydra/launcher=slurm", "cluster"), ("hydra/sweeper=pareto", "search")):
        monkeypatch.setattr(sys, "argv", ["cdnv2-train", "-m", option])
        with pytest.raises(SystemExit) as e:
            train_cli.main()
        assert e.value.code == 2
        assert f"pip install 'cdnv2[{extra}]'" in capsys.readouterr().err


# ---------------------------------------------------------------- launcher presets
@pytest.mark.parametrize("text,minutes", [("90", 90), ("24:00:00", 1440), ("1-12", 2160),
                                          ("2-00:30:00", 2910), ("10:30", 11), ("0:10:01", 11)])
def test_slurm_time_formats(text, minutes):
    assert launchers.time_to_minutes(text) == minutes


@pytest.mark.parametrize("text", ["1h", "", "1-", "0"])
def test_bad_slurm_time_is_a_config_error(text):
    with pytest.raises(ConfigError, match="hydra.launcher.time"):
        launchers.time_to_minutes(text)


def test_bad_slurm_time_exits_2_before_hydra(monkeypatch, capsys):
    from cdnv2.cli import train as train_cli

    monkeypatch.setattr(sys, "argv", ["cdnv2-train", "-m", "hydra/launcher=slurm", "hydra.launcher.time=1h"])
    with pytest.raises(SystemExit) as e:
        train_cli.main()
    assert e.value.code == 2
    assert "hydra.launcher.time='1h': not a Slurm time" in capsys.readouterr().err


def test_one_process_per_gpu():
    assert launchers.job_resources(8, None, "1:00:00") == {"gpus_per_node": 8, "tasks_per_node": 8, "timeout_min": 60}
    assert launchers.job_resources(0, None, "5")["tasks_per_node"] == 1
    assert launchers.job_resources(0, 2, "5")["tasks_per_node"] == 2


def test_slurm_preset_writes_the_sbatch_script(tmp_path, monkeypatch):
    """Typed keys compose and become the job's #SBATCH lines (a stand-in srun: no cluster here)."""
    from hydra import compose, initialize_config_module
    from hydra.core.plugins import Plugins
    from omegaconf import OmegaConf

    from cdnv2.cli import train as train_cli  # noqa: F401  (registers the schemas)

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with initialize_config_module("cdnv2.configs", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                          "hydra.launcher.gpus=4", "hydra.launcher.time=2-00:00:00",
                                          "hydra.launcher.constraint=a100"], return_hydra_config=True)
        with pytest.raises(Exception, match="gpus"):
            compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus=many"])
    conf = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    conf.update(submitit_folder=str(tmp_path / "%j"), name="cdnv2")
    executor = Plugins.instance()._instantiate(OmegaConf.create(conf))._executor()
    script = executor._executor._make_submission_file_text("python -c pass", "uid")
    for line in ["--partition=gpu", "--gpus-per-node=4", "--ntasks-per-node=4", "--time=2880",
                 "--constraint=a100", "--signal=USR2@300", "--nodes=1"]:
        assert f"#SBATCH {line}\n" in script, script
    assert executor._executor.max_num_timeout == 20


# ---------------------------------------------------------------- Pareto front
def test_pareto_front_keeps_only_non_dominated_points():
    points = [(80.0, 10.0), (85.0, 20.0), (79.0, 15.0), (85.0, 25.0), (90.0, 40.0), (80.0, 10.0)]
    assert search.pareto_front(points) == [0, 5, 1, 4]
    with pytest.raises(ConfigError, match="hydra.sweeper.cost"):
        search.check_cost("energy")


# ---------------------------------------------------------------- end to end
@pytest.mark.ci
def test_sweep_records_a_failing_job_and_skips_finished_ones(tmp_path):
    """lgc_condense=3 does not divide: recorded, the sweep goes on; a re-run skips the finished job."""
    args = ["-m", *SWEEP, "model.lgc_condense=3,4"]
    sweep_dir = tmp_path / "sweeps" / sweeps.derive_sweep_name(args)
    first = cli("cdnv2-train", *args, cwd=tmp_path)
    assert first.returncode == sweeps.SWEEP_EXIT_CODE, first.stderr[-3000:]
    assert "1 of 2 jobs did not finish" in first.stderr and "Traceback" not in first.stderr
    failed, done = _summary(sweep_dir)
    assert (failed["status"], failed["exit_code"]) == ("failed", "2")
    assert "not divisible by condense_factor=3" in failed["reason"]
    assert done["status"] == "finished" and float(done["compact_top1"]) >= 0
    assert float(done["compact_latency_ms"]) > 0 and float(done["paper_mflops"]) > 0
    assert "| failed | 2 |" in (sweep_dir / "summary.md").read_text()
    report = (sweep_dir / "1" / "report.json").read_text()

    again = cli("cdnv2-train", *args, cwd=tmp_path)
    assert again.returncode == sweeps.SWEEP_EXIT_CODE
    assert f"{sweep_dir / '1'}: already finished; skipped" in again.stderr
    assert (sweep_dir / "1" / "report.json").read_text() == report
    assert [row["status"] for row in _summary(sweep_dir)] == ["failed", "finished"]


@pytest.mark.slow
def test_killed_sweep_resumes_its_unfinished_job(tmp_path):
    args = ["-m", *SWEEP, "model.lgc_condense=3,4", "sweep_name=killed"]  # the same folder with and without the kill
    sweep_dir = tmp_path / "sweeps" / "killed"
    killed = cli("cdnv2-train", *args, callback("kill", "KillAtStep", step=6), cwd=tmp_path)  # epoch 2 of 2
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (sweep_dir / "1" / "checkpoints" / "last.pt").exists()
    resumed = cli("cdnv2-train", *args, cwd=tmp_path)
    assert resumed.returncode == sweeps.SWEEP_EXIT_CODE, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert json.loads((sweep_dir / "1" / "report.json").read_text())["steps"] == 2 * 4
    assert [row["status"] for row in _summary(sweep_dir)] == ["failed", "finished"]


@pytest.mark.ci
def test_pareto_search_three_trials(tmp_path):
    r = cli("cdnv2-train", "-m", "hydra/sweeper=pareto", "experiment=quick", "hydra.sweeper.n_trials=3",
            "data.num_train=256", "data.num_val=64", "data.batch_size=32", "trainer.progress=lines",
            "trainer.threads=1", "sweep_name=search", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "search"
    rows = _summary(sweep_dir)
    assert len(rows) == 3 and all(row["status"] == "finished" for row in rows)
    assert all("model.lgc_condense=" in row["overrides"] and "condense.end_fraction=" in row["overrides"]
               for row in rows)
    with open(sweep_dir / "pareto.csv") as f:
        front = list(csv.DictReader(f))
    points = {row["job"]: (float(row["compact_top1"]), float(row["paper_mflops"])) for row in rows}
    on_front = {row["job"] for row in front}
    for job, (acc, cost) in points.items():  # the front is exactly the non-dominated runs
        dominated = any(a >= acc and c <= cost and (a, c) != (acc, cost) for a, c in points.values())
        assert (job in on_front) == (not dominated), (job, points)
    assert (sweep_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "Pareto front" in r.stdout


def _task_pid(folder: Path) -> int | None:
    """The submitit task process working on ``folder`` (found through /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and any(str(folder).encode() in c for c in cmd):
            return int(proc.name)
    return None


@pytest.mark.ci
def test_submitit_local_preemption_checkpoints_requeues_and_resumes(tmp_path):
    """The stock hydra/launcher=submitit_local: preempt a job, it checkpoints, requeues, finishes."""
    args = ["-m", "hydra/launcher=submitit_local", *SWEEP, "trainer.epochs=3", "sweep_name=pre"]
    slow = callback("slow", "SlowSteps", seconds=0.5)  # time to preempt it mid-run
    proc = subprocess.Popen([str(BIN / "cdnv2-train"), *args, slow], cwd=tmp_path, env=command_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "sweeps" / "pre" / "0"
    metrics, deadline = run_dir / "metrics.jsonl", time.time() + 300
    pid = None
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any('"step": 2' in line for line in metrics.read_text().splitlines()):
            pid = _task_pid(tmp_path / "sweeps" / "pre")
            break
        time.sleep(0.1)
    assert pid is not None, proc.communicate()[1][-3000:]
    os.kill(pid, signal.SIGUSR2)  # what Slurm sends before a time limit or preemption
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    logs = "".join(p.read_text() for p in (tmp_path / "sweeps" / "pre" / ".submitit").rglob("*_log.err"))
    assert "checkpointing, then requeueing" in logs and "Requeued" in logs
    assert "resumed from" in logs
    assert json.loads((run_dir / "report.json").read_text())["steps"] == 3 * 4
    assert _summary(tmp_path / "sweeps" / "pre")[0]["status"] == "finished"


@pytest.mark.slow
def test_slurm_local_records_a_job_whose_process_died(tmp_path):
    """hydra/launcher=slurm_local: the first job to reach step 3 is SIGKILLed; the other finishes."""
    args = ["-m", "hydra/launcher=slurm_local", *SWEEP, "seed=0,1", "sweep_name=dead"]
    r = cli("cdnv2-train", *args, callback("kill", "KillAtStep", step=3, once=str(tmp_path / "once")), cwd=tmp_path)
    assert r.returncode == sweeps.SWEEP_EXIT_CODE, r.stderr[-3000:]
    rows = _summary(tmp_path / "sweeps" / "dead")
    assert sorted(row["status"] for row in rows) == ["died", "finished"], rows
    dead = next(row for row in rows if row["status"] == "died")
    assert "FailedJobError" in dead["reason"] or "UncompletedJobError" in dead["reason"]
    again = cli("cdnv2-train", *args, cwd=tmp_path)  # the dead job resumes, the other is skipped
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(row["status"] == "finished" for row in _summary(tmp_path / "sweeps" / "dead"))


@pytest.mark.slow
def test_slurm_local_two_processes_per_job(tmp_path):
    """tasks_per_node=2: each sweep point is a two-process (Gloo) job, like torchrun."""
    r = cli("cdnv2-train", "-m", "hydra/launcher=slurm_local", "hydra.launcher.tasks_per_node=2", *SWEEP,
            "sweep_name=two", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "sweeps" / "two" / "0" / "report.json").read_text())
    assert report["masks_identical_across_ranks"] is True
