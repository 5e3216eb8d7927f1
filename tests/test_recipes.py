"""Training recipes: BN re-estimation after condensation steps, gradient accumulation."""
import copy

import pytest
import torch
from torch import nn

from cdnv2.condense import CondenseConfig, condensing_layers
from cdnv2.data import DataConfig
from cdnv2.engine import TrainConfig, Trainer, TrainerConfig, train
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
    seen = recalibrate_bn([model], iter(batches))
    assert seen == 24
    with torch.no_grad():
        acts = torch.cat([model[0](b) for b in batches])  # per-batch stats, averaged (update_bn)
    per_batch_mean = torch.stack([model[0](b).mean((0, 2, 3)) for b in batches]).mean(0).detach()
    assert torch.allclose(model[1].running_mean, per_batch_mean, atol=1e-5)
    assert acts.shape[0] == 24
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


class StepProbe(Callback):
    """Validation top-1 right before and right after every condensation step."""

    def __init__(self):
        self.rows = []

    def on_step_end(self, trainer):
        if trainer.condenser.due(trainer.step + 1):
            self.before = trainer.run_eval(trainer.eval_model(), "probe").top1
        if trainer.condenser.due(trainer.step):
            after = trainer.run_eval(trainer.eval_model(), "probe").top1
            self.rows.append((trainer.step, self.before, after))


def test_bn_recal_keeps_accuracy_through_a_condensation_step(tmp_path):
    """A tiny run that has learned something before its first step: with stale BN statistics
    the step costs many points of validation top-1; re-estimated, it costs few.

    (One step of training lies between the two evaluations, as in the bench script's
    'after' column; docs/recipes.md has the full table.)"""
    def run(recal, name):
        cfg = TrainConfig(
            data=DataConfig(num_train=512, num_val=128, batch_size=32),
            condense=CondenseConfig(bn_recal_batches=recal, lgc_fractions=[0.4, 0.45, 0.5],
                                    sfr_fractions=[0.4, 0.45, 0.5]),
            trainer=TrainerConfig(epochs=2, progress="none", parity_samples=4, stage_snapshots=False),
            resume="never",
        )
        probe = StepProbe()
        train(cfg, tmp_path / name, callbacks=[probe])
        return probe.rows

    stale, fixed = run(0, "stale"), run(8, "fixed")
    assert [r[0] for r in stale] == [r[0] for r in fixed]
    drop_stale = max(b - a for _, b, a in stale)
    drop_fixed = max(b - a for _, b, a in fixed)
    assert stale[0][1] > 40  # learned something before the first step
    assert drop_fixed <= 10, fixed
    assert drop_stale > drop_fixed + 10, (stale, fixed)


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
