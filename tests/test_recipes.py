"""Training recipes: BN re-estimation after condensation steps, gradient accumulation,
optimizers and schedules, augmentation policies, per-epoch logs, distillation, MLflow."""
import pytest
import torch
from torch import nn

from cdnv2.condense import CondenseConfig, condensing_layers
from cdnv2.data import DataConfig
from cdnv2.engine import OptimConfig, TrainConfig, Trainer, TrainerConfig, train
from cdnv2.engine.bn_recal import batchnorms, recalibrate_bn
from cdnv2.engine.callbacks import Callback
from cdnv2.engine.validation import validate_config
from cdnv2.errors import ConfigError

from fault_injection import Crash, CrashAtStep
from helpers import QUICK, assert_same_state, load, run_like_cli


def _cfg(batch=32, accum=1, epochs=2, recal=0, **trainer) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(num_train=64, num_val=32, batch_size=batch),
        condense=CondenseConfig(bn_recal_batches=recal),
        trainer=TrainerConfig(epochs=epochs, accum_steps=accum, progress="none", parity_samples=4,
                              stage_snapshots=False, **trainer),
        resume="never",
    )


# ---------------------------------------------------------------- BN re-estimation
def test_recalibrate_bn_gives_the_statistics_of_the_batches_and_restores_modes():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    model.train()
    batches = [torch.randn(8, 3, 4, 4) * 3 + 1 for _ in range(3)]
    assert recalibrate_bn([model], iter(batches)) == 24
    with torch.no_grad():  # a cumulative average of the per-batch statistics (update_bn)
        acts = [model[0](b) for b in batches]
    mean = torch.stack([a.mean((0, 2, 3)) for a in acts]).mean(0)
    var = torch.stack([a.transpose(0, 1).flatten(1).var(1) for a in acts]).mean(0)
    assert torch.allclose(model[1].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, var, rtol=1e-4)
    assert model.training and model[1].training and model[2].training  # modes restored
    assert model[1].momentum == 0.1


def test_recalibrate_bn_pools_ranks_as_one_set():
    """Two 'ranks' with equal shares of the images end with the statistics of all of them."""
    xa, xb = torch.randn(64, 2), torch.randn(64, 2) * 2 + 3
    bn_b = nn.BatchNorm1d(2)
    recalibrate_bn([bn_b], [xb])
    other = [bn_b.running_mean.double(), bn_b.running_var.double() + bn_b.running_mean.double() ** 2]
    bn_a = nn.BatchNorm1d(2)
    recalibrate_bn([bn_a], [xa], average=lambda t: (t + other.pop(0)) / 2)  # all_reduce_sum / 2
    both = torch.cat([xa, xb])
    assert torch.allclose(bn_a.running_mean, both.mean(0), atol=1e-5)
    # unbiased per-rank variances pooled: within the (n-1)/n of a 64-image share
    assert torch.allclose(bn_a.running_var, both.var(0), rtol=0.02)


class _Stop(Exception):
    pass


class FirstStepProbe(Trainer):
    """Evaluates right before and right after the first condensation step, then stops."""

    def after_step(self):
        if not self.condenser.due(self.step + 1):
            return super().after_step()
        before = self.run_eval(self.eval_model(), "probe").top1
        super().after_step()
        raise _Stop(before, self.run_eval(self.eval_model(), "probe").top1)


def _first_step(tmp_path, recal: int) -> tuple[float, float]:
    cfg = TrainConfig(
        data=DataConfig(num_train=2048, num_val=128, batch_size=32),
        optim=OptimConfig(lr=0.1),
        condense=CondenseConfig(bn_recal_batches=recal, lgc_fractions=[0.75, 0.85, 0.95],
                                sfr_fractions=[0.75, 0.85, 0.95]),
        trainer=TrainerConfig(epochs=1, progress="none", stage_snapshots=False),
        resume="never",
    )
    with pytest.raises(_Stop) as stop:
        FirstStepProbe(cfg, tmp_path / f"recal{recal}").fit()
    return stop.value.args


@pytest.mark.ci  # two 48-step runs: ~1 min alone, 5 min on the loaded shared CPU
def test_bn_recal_keeps_accuracy_through_a_condensation_step(tmp_path):
    """Top-1 right before and right after the first condensation step of a tiny run (step 48
    of 64): with stale BN statistics the step costs most of what was learned; with them
    re-estimated on 8 batches it stays within a few points (docs/recipes.md: the full run)."""
    before, stale = _first_step(tmp_path, 0)
    same_before, fixed = _first_step(tmp_path, 8)
    print("top-1 before / after (stale BN) / after (re-estimated):", before, stale, fixed)
    # measured: 49.2 before; 32.8 after with stale statistics, 48.4 re-estimated
    assert before == same_before and before > 40, before  # learned something; same run up to here
    assert before - fixed <= 5, (before, fixed)
    assert before - stale >= 10, (before, stale)


@pytest.mark.ci
def test_bn_recal_is_exact_under_resume(tmp_path):
    """Crashed after a condensation step whose recal is not in the last checkpoint: the
    resumed run redoes the step and its recal and ends with the uninterrupted run's weights."""
    run_like_cli(tmp_path / "ref", *QUICK)
    with pytest.raises(Crash):
        run_like_cli(tmp_path / "crashed", *QUICK, callbacks=[CrashAtStep(7)])
    assert load(tmp_path / "crashed/checkpoints/last.pt")["step"] == 4  # before the step-6 recal
    run_like_cli(tmp_path / "crashed", *QUICK)
    ref, final = load(tmp_path / "ref/checkpoints/last.pt"), load(tmp_path / "crashed/checkpoints/last.pt")
    assert final["step"] == ref["step"]
    assert_same_state(final["model_state"], ref["model_state"])


class StepGaps(Trainer):
    """Top-1 before each step's fade began, right before the step and right after it;
    stops after the last step."""

    rows: list
    faded_from = None

    def after_step(self):
        done = self.step + 1
        if self.condenser.fading(done) and not self.condenser.fading(self.step):
            self.faded_from = self.run_eval(self.eval_model(), "probe").top1
        if not self.condenser.due(done):
            return super().after_step()
        before = self.run_eval(self.eval_model(), "probe").top1
        super().after_step()
        after = self.run_eval(self.eval_model(), "probe").top1
        self.rows.append((done, before if self.faded_from is None else self.faded_from, before, after))
        self.faded_from = None
        if done == self.condenser.final_step:
            raise _Stop(self.rows)


def _step_gaps(tmp_path, fade: float) -> list:
    cfg = TrainConfig(
        data=DataConfig(num_train=1024, num_val=128, batch_size=32),
        optim=OptimConfig(lr=0.1),
        condense=CondenseConfig(fade_fraction=fade, lgc_fractions=[0.55, 0.7, 0.85],
                                sfr_fractions=[0.55, 0.7, 0.85]),
        trainer=TrainerConfig(epochs=2, progress="none", stage_snapshots=False),
        resume="never",
    )
    probe = StepGaps(cfg, tmp_path / f"fade{fade}")
    probe.rows = []
    with pytest.raises(_Stop):
        probe.fit()
    return probe.rows


@pytest.mark.ci  # two 55-step runs with 7 evaluations each: ~2 min alone, 5 on the loaded CPU
def test_fade_keeps_accuracy_through_every_condensation_step(tmp_path):
    """condense.fade_fraction=0.1: the top-1 right after each of the three steps stays within
    5 points of right before it; the hard step (BN re-estimated, fade 0) loses more at some step.

    Measured (step, before fade, before, after): hard (36, -, 43.8, 39.1), (45, -, 47.7, 45.3),
    (55, -, 51.6, 32.0); gentle (36, 38.3, 39.1, 39.8), (45, 45.3, 32.0, 43.0), (55, 51.6, 26.6,
    36.7): the step itself no longer costs, but counted from before the ramp the third one still
    loses 15 points (hard: 19.5); docs/recipes.md."""
    hard = _step_gaps(tmp_path, 0.0)
    gentle = _step_gaps(tmp_path, 0.1)
    print("(step, before fade, before, after) hard:", hard, "gentle:", gentle)
    assert all(before - after <= 5 for _, _, before, after in gentle), gentle
    assert any(before - after > 5 for _, _, before, after in hard), hard


def test_evaluations_inside_a_fade_window_re_estimate_bn_first(tmp_path, monkeypatch):
    """While weights fade towards a step, each epoch's evaluation first re-estimates the BN
    statistics (they were collected on weights the ramp has since shrunk); outside the
    windows only the steps themselves do."""
    import cdnv2.engine.trainer as trainer_module

    calls = []

    def spy(t):
        calls.append(t.step)
        return real(t)

    real = trainer_module.recalibrate_after_condense
    monkeypatch.setattr(trainer_module, "recalibrate_after_condense", spy)
    cfg = _cfg(batch=16, epochs=4, recal=1)
    cfg.condense.fade_fraction = 0.3
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    epoch_ends = range(trainer.steps_per_epoch, trainer.total_steps + 1, trainer.steps_per_epoch)
    in_window = [s for s in epoch_ends if trainer.condenser.fading(s)]
    steps = sorted({s for fire in trainer.condenser.fire_at.values() for s in fire})
    assert in_window and set(in_window).isdisjoint(steps)
    assert sorted(calls) == sorted(steps + in_window)


def test_fade_ramps_the_dropped_weights_to_zero_by_the_step():
    """The weights a step will drop fall linearly to exactly zero one step before it, the
    mask then removes exactly those, and the rest is untouched: a function of the step
    count and the weights only (a copy taken mid-ramp continues identically)."""
    import copy

    import cdnv2
    from cdnv2.condense import Condenser

    torch.manual_seed(0)
    model = cdnv2.create_model("cdnv2_tiny")
    condenser = Condenser(model, 100, CondenseConfig(fade_fraction=0.05))  # fires at 17, 34, 50
    assert condenser.fade_steps == 5 and [t for t in range(1, 18) if condenser.fading(t)] == [12, 13, 14, 15, 16]
    _, layer = condensing_layers(model)[0]
    w0 = layer.conv.weight.detach().clone()
    snapshots = {}
    for t in range(1, 18):
        condenser.step(t)
        if condenser.fading(t):
            condenser.fade(t)
        snapshots[t] = layer.conv.weight.detach().clone()
        if t == 13:
            resumed = copy.deepcopy(model)
    dropped = layer.mask == 0
    assert int(layer.stage) == 1 and dropped.float().mean() == 0.25
    assert torch.equal(snapshots[16][dropped], torch.zeros_like(w0[dropped]))
    assert torch.allclose(snapshots[14][dropped], w0[dropped] * 2 / 5)  # linear: 4/5, 3/5, 2/5, 1/5, 0
    assert torch.equal(snapshots[17][~dropped], w0[~dropped])
    again = Condenser(resumed, 100, CondenseConfig(fade_fraction=0.05))
    for t in range(14, 18):
        again.step(t)
        if again.fading(t):
            again.fade(t)
    assert torch.equal(condensing_layers(resumed)[0][1].conv.weight, layer.conv.weight)


# ---------------------------------------------------------------- accumulation
class FrozenBN(Callback):
    """BatchNorm in eval mode for the whole run (it computes per-(micro-)batch statistics
    otherwise, the one thing accumulation cannot reproduce); records lrs and masks."""

    def __init__(self):
        self.lrs, self.masks = [], {}

    def on_fit_start(self, trainer):
        for bn in batchnorms(trainer.model):
            bn.eval()
            bn.train = lambda mode=True, bn=bn: bn  # model.train() leaves it in eval mode

    def on_step_end(self, trainer):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
        if trainer.condenser.due(trainer.step):
            self.masks[trainer.step] = [m.mask.clone() for _, m in condensing_layers(trainer.model)]


def test_accumulation_matches_one_large_batch(tmp_path):
    """4 micro-batches of 8 per step == one batch of 32: same schedule, masks, weights."""
    runs = {}
    for accum in (1, 4):
        probe = FrozenBN()
        train(_cfg(batch=32, accum=accum), tmp_path / f"a{accum}", callbacks=[probe])
        runs[accum] = probe, load(tmp_path / f"a{accum}" / "checkpoints" / "last.pt")
    (p1, s1), (p4, s4) = runs[1], runs[4]
    assert s1["step"] == s4["step"] == 4
    assert p1.lrs == p4.lrs
    assert sorted(p1.masks) == sorted(p4.masks) and len(p1.masks) >= 2
    for step in p1.masks:
        for a, b in zip(p1.masks[step], p4.masks[step]):
            assert torch.equal(a, b), step
    for name, w in s1["model_state"].items():
        if w.is_floating_point():
            assert torch.allclose(w, s4["model_state"][name], atol=2e-5, rtol=1e-4), name


def test_accum_steps_must_divide_the_batch():
    with pytest.raises(ConfigError, match="trainer.accum_steps=3 does not divide data.batch_size=32"):
        validate_config(_cfg(batch=32, accum=3))
    with pytest.raises(ConfigError, match="trainer.accum_steps=0"):
        validate_config(_cfg(accum=0))


# ---------------------------------------------------------------- optimizers and schedules
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_each_optimizer_builds_steps_and_skips_bn_and_bias_decay(name):
    from cdnv2.engine import OptimConfig
    from cdnv2.engine.optim import build_optimizer, prime_momentum, step_unless

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.1), lr=0.01)
    assert isinstance(opt, {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name])
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model[0].weight)] == 0.1 and decays[id(model[3].weight)] == 0.1
    assert decays[id(model[0].bias)] == decays[id(model[1].weight)] == decays[id(model[3].bias)] == 0.0
    before = [p.clone() for p in model.parameters()]
    prime_momentum(opt)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    step_unless(opt, torch.ones(()))  # skipped on the device
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    step_unless(opt, torch.zeros(()))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_schedules_follow_their_curves_after_the_same_warmup():
    from cdnv2.engine import SchedConfig
    from cdnv2.engine.optim import lr_at

    def curve(**kw):
        cfg = SchedConfig(warmup_start_factor=0.5, **kw)
        return [round(lr_at(s, 110, 10, 1.0, cfg), 6) for s in (0, 5, 10, 35, 60, 85, 110)]

    warm = [0.5, 0.75, 1.0]
    assert curve(name="cosine") == warm + [0.853553, 0.5, 0.146447, 0.0]
    assert curve(name="linear", min_lr=0.1) == warm + [0.775, 0.55, 0.325, 0.1]
    assert curve(name="constant") == warm + [1.0, 1.0, 1.0, 1.0]
    assert curve(name="step", milestones=[0.5, 0.75], decay_rate=0.1) == warm + [1.0, 0.1, 0.01, 0.01]


def test_optim_and_sched_groups_compose_and_validate():
    from cdnv2.cli.train import compose_train_config
    from cdnv2.engine import SchedConfig

    for group in ("optim=adamw", "sched=step", "sched=linear", "sched=constant"):
        cfg = compose_train_config([group])
        validate_config(TrainConfig(**{k: getattr(cfg, k) for k in TrainConfig.__dataclass_fields__}))
    assert compose_train_config(["optim=adamw"]).optim.name == "adamw"
    with pytest.raises(ConfigError, match="sched.milestones"):
        validate_config(TrainConfig(sched=SchedConfig(name="step", milestones=[0.8, 0.5])))


# ---------------------------------------------------------------- auto-augment policies
@pytest.mark.parametrize("policy,cls", [
    ("randaugment", "RandAugmentNoise"), ("trivialaugment", "TrivialAugmentWide"),
    ("autoaugment", "AutoAugment"), ("augmix", "AugMix"), ("none", None),
])
def test_auto_augment_policies_build_and_run_on_tensors_and_pil(policy, cls):
    from PIL import Image

    from cdnv2.data.transforms import build_train_transform

    cfg = DataConfig(auto_augment=policy, randaugment_magnitude=9)
    transform = build_train_transform(cfg, [0.5] * 3, [0.3] * 3)
    names = [type(op).__name__ for op in transform.transforms]
    if cls:
        assert cls in names
    else:
        assert not {"RandAugmentNoise", "TrivialAugmentWide", "AutoAugment", "AugMix"} & set(names)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    for x in (img, Image.fromarray(img.permute(1, 2, 0).numpy())):
        torch.manual_seed(1)
        a = transform(x)
        torch.manual_seed(1)
        assert a.shape == (3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, transform(x))


def test_randaugment_stays_off_without_a_magnitude_and_unknown_policies_are_refused():
    from cdnv2.data.transforms import build_train_transform

    names = [type(op).__name__ for op in build_train_transform(DataConfig(), [0.5] * 3, [0.3] * 3).transforms]
    assert "RandAugmentNoise" not in names  # the default: randaugment, magnitude null
    with pytest.raises(ConfigError, match="data.auto_augment='randaug'.*did you mean randaugment"):
        validate_config(TrainConfig(data=DataConfig(auto_augment="randaug")))


# ---------------------------------------------------------------- per-epoch log
def test_epochs_csv_and_tensorboard_hparams(tmp_path):
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    report = train(_cfg(batch=32, accum=2), tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "epochs.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["step"] for r in rows] == ["2", "4"]
    assert list(rows[0]) == ["epoch", "step", "lr", "train_loss", "val_top1", "val_top5", "val_loss",
                             "density_lgc", "density_sfr", "epoch_seconds", "images_per_second",
                             "peak_memory_mib"]
    metrics = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    top1 = [float(m["value"]) for m in metrics if m["name"] == "val/top1"]
    assert [float(r["val_top1"]) for r in rows] == pytest.approx(top1)
    assert float(rows[1]["density_lgc"]) == 0.25  # fully condensed (C=4) after epoch 2
    assert all(float(r["train_loss"]) > 0 and float(r["images_per_second"]) > 0 for r in rows)
    assert float(rows[0]["peak_memory_mib"]) > 10
    events = EventAccumulator(str(tmp_path / "tb"))  # the HParams entry's final numbers
    events.Reload()
    assert events.Scalars("final/compact_top1")[0].value == pytest.approx(report["compact"]["top1"])


# ---------------------------------------------------------------- distillation
def test_distill_loss_is_t_squared_kl_of_the_soft_targets():
    from cdnv2.engine.distill import distill_loss

    s, t = torch.randn(4, 5), torch.randn(4, 5)
    temp = 3.0
    p_t = torch.softmax(t / temp, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / temp, 1))).sum(1).mean()
    assert torch.allclose(distill_loss(s, t, temp), kl * temp ** 2, atol=1e-6)
    assert distill_loss(t, t, temp).abs() < 1e-6  # a student equal to its teacher pays nothing
    s.requires_grad_(True)
    distill_loss(s, t, 1.0).backward()  # T=1: gradient softmax(s) - softmax(t), per sample / batch
    assert torch.allclose(s.grad, (torch.softmax(s, 1) - torch.softmax(t, 1)).detach() / 4, atol=1e-6)


def test_teachers_from_torchvision_names_and_cdnv2_files(tmp_path):
    from cdnv2.engine.distill import DistillConfig, build_teacher, teacher_logits

    tv = build_teacher(DistillConfig(teacher="resnet18"), num_classes=3)  # no download: no weights
    assert not tv.training and not any(p.requires_grad for p in tv.parameters())
    assert teacher_logits(tv, torch.randn(2, 3, 32, 32), 3).shape == (2, 3)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    loaded = build_teacher(DistillConfig(teacher="resnet18", teacher_weights=str(tmp_path / "r18.pth")), 3)
    assert all(torch.equal(a, b) for a, b in zip(tv.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ConfigError, match="predicts 3 classes, the data has 5"):
        teacher_logits(tv, torch.randn(2, 3, 32, 32), 5)
    with pytest.raises(ConfigError, match="distill.teacher='resnet_51' is neither a file"):
        validate_config(TrainConfig(distill=DistillConfig(teacher="resnet_51")))


def test_distillation_run_logs_the_teacher_and_trains(tmp_path):
    """A cdnv2 checkpoint as the teacher of a fresh student (with mixup, through accumulation)."""
    import csv

    from cdnv2.engine.distill import DistillConfig

    teacher_report = train(_cfg(batch=32, epochs=2), tmp_path / "teacher")
    cfg = _cfg(batch=32, accum=2, epochs=1)
    cfg.distill = DistillConfig(teacher=str(tmp_path / "teacher" / "model_compact.pt"), alpha=1.0)
    cfg.optim = OptimConfig(mixup_alpha=0.2)
    report = train(cfg, tmp_path / "student")
    metrics = list(csv.DictReader(open(tmp_path / "student" / "metrics.csv")))
    teacher = [float(m["value"]) for m in metrics if m["name"] == "distill/teacher_top1"]
    assert teacher == [pytest.approx(teacher_report["compact"]["top1"])]  # same val split, same model
    assert report["steps"] == 2


def _kd_cfg(num_train: int, epochs: int, teacher=None) -> TrainConfig:
    from cdnv2.engine.distill import DistillConfig

    return TrainConfig(
        data=DataConfig(num_train=num_train, num_val=256, batch_size=32),
        optim=OptimConfig(lr=0.1),
        condense=CondenseConfig(bn_recal_batches=0),
        trainer=TrainerConfig(epochs=epochs, progress="none", parity_samples=4, stage_snapshots=False,
                              compact_training="false"),
        distill=DistillConfig(teacher=teacher and str(teacher), alpha=1.0),
        resume="never",
    )


@pytest.mark.ci  # a 128-step teacher and two 24-step students: ~2 min alone, 6 on the loaded CPU
def test_a_stronger_teacher_makes_a_better_student(tmp_path):
    """The same student (seed, 128 images, 24 steps) with and without a teacher trained on
    16x the images: the distilled one is clearly better on the same 256 val images."""
    teacher = train(_kd_cfg(2048, 2), tmp_path / "teacher")
    plain = train(_kd_cfg(128, 6), tmp_path / "plain")
    taught = train(_kd_cfg(128, 6, tmp_path / "teacher" / "model_compact.pt"), tmp_path / "taught")
    print("top-1 teacher / plain / taught:", teacher["top1"], plain["top1"], taught["top1"])
    # measured with seeds 0, 1, 2 for the students (teacher seed 0, 54.3): plain 12.5, 9.8, 13.7;
    # taught 33.6, 20.3, 16.4 (the margin depends on the seed: 21, 10.5, 2.7; this test is seed 0)
    assert teacher["top1"] > plain["top1"] + 20
    assert taught["top1"] > plain["top1"] + 10


# ---------------------------------------------------------------- trackers
def test_logger_group_picks_mlflow_and_keeps_trainer_mlflow():
    from cdnv2.cli.train import compose_train_config

    assert compose_train_config([]).trainer.mlflow is False  # logger=tensorboard, the default
    assert compose_train_config(["logger=mlflow"]).trainer.mlflow is True
    assert compose_train_config(["trainer.mlflow=true"]).trainer.mlflow is True  # the older spelling


def test_mlflow_run_in_a_local_store_reads_back(tmp_path):
    """``logger=mlflow``: a real MLflow store under the run folder: params, per-step
    metrics, final numbers."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from cdnv2.engine.mlflow_logger import EXPERIMENT, default_uri

    report = run_like_cli(tmp_path, "logger=mlflow", "data.num_train=64", "data.num_val=32", "data.batch_size=32",
                          "trainer.epochs=2", "trainer.progress=none", "trainer.parity_samples=4",
                          "trainer.stage_snapshots=false", "trainer.threads=1")
    client = MlflowClient(tracking_uri=default_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.accum_steps"] == "1" and run.data.params["model.name"] == "cdnv2_tiny"
    top1 = client.get_metric_history(run.info.run_id, "val/top1")
    assert [m.step for m in top1] == [2, 4]
    assert run.data.metrics["final/compact_top1"] == pytest.approx(report["compact"]["top1"])
    assert (tmp_path / "tb").is_dir()
