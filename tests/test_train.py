"""cdnv2-train: in-process runs, the real command, resume, sweeps and config errors."""
import json

import pytest
import torch

import cdnv2
from cdnv2 import checkpoint as ckpt
from cdnv2.cli.train import compose_train_config, run_command
from cdnv2.engine import train
from cdnv2.engine.state import TrainState
from cdnv2.errors import CheckpointError, ConfigError

from helpers import QUICK, assert_same_state, callback, cli, load, quick_config, restored_process_state


def test_full_path_in_process(tmp_path):
    report = train(quick_config(ema_decay=0.9), tmp_path)
    for name in ("report.json", "model_compact.pt", "metrics.jsonl", "metrics.csv", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["top1"] == report["top1"]
    c = report["compact"]
    assert c["parity_max_abs_diff"] <= 1e-4 * max(1.0, c["parity_output_scale"])
    assert abs(c["top1"] - report["top1"]) < 1.0  # float rounding may flip a borderline sample
    assert report["weights"] == "ema"
    assert report["params"]["compact"] < report["params"]["masked"]
    # a stage snapshot per condensation step of cdnv2_tiny (C=4 -> 3 steps)
    assert len(list((tmp_path / "checkpoints").glob("condense-step*.pt"))) == 3
    last = load(tmp_path / "checkpoints/last.pt")
    assert last["structure"] == "compact_train"
    assert last["step"] == 12 and last["class_names"] == report_classes()
    # the compact artifact rebuilds alone and gives the trainer's compact numbers
    model = cdnv2.load_model(tmp_path / "model_compact.pt")
    x = torch.randn(4, 3, 32, 32)
    assert model(x).shape == (4, 10)


def test_train_state_is_the_checkpoint_schema_and_round_trips():
    model = cdnv2.create_model("cdnv2_tiny")
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    state.step, state.epoch, state.best_top1, state.last_eval = 5, 1, 42.0, {"top1": 42.0}
    saved = state.state_dict()
    assert tuple(saved) == ckpt.TRAIN_STATE_KEYS
    file = ckpt.train_checkpoint({k: None for k in ckpt.TRAIN_RUN_KEYS}, saved)
    ckpt.check_resumable(file, "f.pt")
    drawn = torch.rand(3)
    other = cdnv2.create_model("cdnv2_tiny")
    fresh = TrainState(model=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9))
    fresh.load_state_dict(saved, new_optimizer=None)  # same structure: the optimizer stays
    assert (fresh.step, fresh.epoch, fresh.best_top1, fresh.last_eval) == (5, 1, 42.0, {"top1": 42.0})
    assert_same_state(fresh.model.state_dict(), model.state_dict())
    assert torch.equal(torch.rand(3), drawn)  # the RNG stream continues where it was saved
    with pytest.raises(CheckpointError, match="lacks key.*optimizer"):
        ckpt.check_resumable({k: v for k, v in file.items() if k != "optimizer"}, "f.pt")
    with pytest.raises(CheckpointError, match="version 2 is newer"):
        ckpt.check_resumable({**file, "version": 2}, "f.pt")


def report_classes():
    from cdnv2.data.shapes import SHAPES_CLASSES

    return list(SHAPES_CLASSES)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """One quick run logging every step, with warmup and group lasso: its metrics.jsonl rows."""
    cfg = quick_config(log_every=1)
    cfg.condense.lasso_lambda = 1e-4
    cfg.sched.warmup_epochs = 1
    run = tmp_path_factory.mktemp("logged")
    train(cfg, run)
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_cover_condensation(logged_run):
    rows = logged_run
    names = set().union(*rows)
    for key in ("train/loss", "train/lr", "train/images_per_second", "val/top1", "val/top5",
                "condense/density_lgc", "condense/density_sfr", "condense/stage_lgc"):
        assert key in names, key
    density = [r["condense/density_lgc"] for r in rows if "condense/density_lgc" in r]
    assert density == sorted(density, reverse=True) and density[-1] == pytest.approx(0.25)


def test_lr_schedule_and_lasso_in_loss(logged_run):
    rows = logged_run
    lrs = [r["train/lr"] for r in rows if "train/lr" in r]
    peak = 0.1 * 32 / 64
    assert lrs[0] == pytest.approx(peak * 0.25) and max(lrs) == pytest.approx(peak)
    assert lrs[-1] < 0.1 * peak
    lasso_steps = [r["step"] for r in rows if "train/lasso" in r]
    assert lasso_steps and max(lasso_steps) < 6  # off once the last stage fired (step 6)


@pytest.mark.slow
def test_real_command_and_resume_after_kill_equals_uninterrupted(tmp_path):
    ref = cli("cdnv2-train", *QUICK, f"hydra.run.dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "cdnv2-train summary" in ref.stdout
    # SIGKILL after step 5: epoch 1's checkpoint (step 4) is the newest; condensation
    # stage 3 (step 6) and the switch to compact training happen after the resume.
    killed = cli("cdnv2-train", *QUICK, f"hydra.run.dir={tmp_path / 'run'}", callback("kill", "KillAtStep", step=5))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "run" / "report.json").exists()
    resumed = cli("cdnv2-train", *QUICK, f"hydra.run.dir={tmp_path / 'run'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    a, b = load(tmp_path / "ref/checkpoints/last.pt"), load(tmp_path / "run/checkpoints/last.pt")
    assert_same_state(a["model_state"], b["model_state"])
    assert a["step"] == b["step"] == 12


@pytest.mark.slow  # tests/test_sweeps.py runs real sweeps with summaries by default
def test_multirun_sweep_writes_summary(tmp_path):
    r = cli(
        "cdnv2-train", "-m", *QUICK, "trainer.epochs=2", "model=cdnv2_tiny,condensenet_50",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and "compact_top1" in summary[0]
    assert "model=cdnv2_tiny" in summary[1] and "model=condensenet_50" in summary[2]
    assert (tmp_path / "0" / "report.json").exists() and (tmp_path / "1" / "report.json").exists()


@pytest.mark.parametrize(
    "override,expected",
    [
        ("trainer.epoch=3", "trainer has no key 'epoch'; did you mean trainer.epochs?"),
        ("+trainer.foo=1", "trainer has no key 'foo'"),
        ("+seeds=1", "the top level has no key 'seeds'; did you mean seed"),
        ("optim.lr=abc", "optim.lr: Value 'abc'"),
        ("trainer.epochs=3.5", "trainer.epochs"),
        ("model=cdnv2_x", "model=cdnv2_x: no such option in group 'model'; did you mean"),
        ("data=imagenett", "did you mean data=imagenet"),
        ("trainer.epochs=[1", "cannot parse"),
    ],
)
def test_config_errors_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        compose_train_config([override])
    assert expected in str(e.value)
    assert "\n" not in str(e.value)  # one paragraph


@pytest.mark.parametrize(
    "override,expected",
    [("model.name=cdnv2_bb", "did you mean cdnv2_b"), ("trainer.amp=fp64", "trainer.amp='fp64'")],
)
def test_bad_values_stop_before_any_work(tmp_path, override, expected):
    cfg = compose_train_config([override])
    with restored_process_state(), pytest.raises(ConfigError, match=expected):
        run_command(cfg, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_config_error_of_the_command_is_one_paragraph_exit_2(tmp_path):
    r = cli("cdnv2-train", "trainer.epoch=3", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "cdnv2-train: error: unknown config key 'trainer.epoch': trainer has no key 'epoch'; "
        "did you mean trainer.epochs?"
    ]
    assert "Traceback" not in r.stderr
    # a sweep is checked value by value, by the same check the command runs first (in-process:
    # a second command start costs seconds)
    from cdnv2.cli.common import check_command_line

    error = check_command_line("train", ["-m", "model=cdnv2_tiny,cdnv2_y", f"hydra.sweep.dir={tmp_path}"])
    assert error.startswith("model=cdnv2_y: no such option") and "\n" not in error, error


def test_paper_recipes_compose():
    cfg = compose_train_config(["model=cdnv2_b", "data=imagenet", "data.root=/x"])
    assert cfg.optim.base_lr == 0.4 and cfg.optim.ref_batch_size == 1024
    assert cfg.data.batch_size == 1024 and cfg.trainer.epochs == 350
    assert cfg.trainer.ema_decay == 0.9998 and cfg.optim.label_smoothing == 0.1
    assert cfg.sched.warmup_epochs == 5 and cfg.optim.weight_decay == 4e-5
    for data in ("cifar10", "cifar100"):
        cfg = compose_train_config([f"data={data}"])
        assert cfg.data.name == data
        assert cfg.trainer.epochs == 300 and cfg.data.batch_size == 64
        assert cfg.optim.weight_decay == 1e-4 and cfg.optim.base_lr == 0.1


def test_every_registered_model_is_a_model_option():
    for name in cdnv2.list_models():
        assert compose_train_config([f"model={name}"]).model.name == name


@pytest.mark.slow
def test_quickstart_reaches_90_percent(tmp_path):
    r = cli("cdnv2-train", f"hydra.run.dir={tmp_path}", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["compact"]["top1"] > 90.0
    assert report["compact"]["parity_max_abs_diff"] <= 1e-4 * max(1.0, report["compact"]["parity_output_scale"])
