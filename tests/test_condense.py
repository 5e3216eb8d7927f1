"""The condensation schedule, group lasso and the mask-safe EMA."""
import copy
import math

import pytest
import torch

import cdnv2
from cdnv2.condense import CondenseConfig, Condenser, ModelEMA, ScheduleError, fire_steps
from cdnv2.layers import LearnedGroupConv, SparseFeatureReactivation


def _model(c):
    # channels divisible by every C used below
    return torch.nn.Sequential(
        LearnedGroupConv(48, 2 * c, groups=c, condense_factor=c),
        SparseFeatureReactivation(c, 48, groups=c, condense_factor=c),
    )


@pytest.mark.parametrize("c", [2, 4, 6, 8])
@pytest.mark.parametrize("total", [1, 3, 7, 391, 1001])
def test_every_stage_fires_once_at_its_fraction(c, total):
    model = _model(c)
    cond = Condenser(model, total)
    fired_at = {}
    for t in range(total + 1):
        event = cond.step(t)
        for name, stage in (event.fired if event else []):
            assert (name, stage) not in fired_at
            fired_at[(name, stage)] = t
        assert cond.step(t) is None  # idempotent
    for name, m in cond.layers:
        assert m.density == pytest.approx(1 / c)
        assert m.fully_condensed
        for s in range(1, c):
            assert fired_at[(name, s)] == max(1, math.ceil(s / (2 * (c - 1)) * total))
    assert cond.final_step <= max(1, math.ceil(total / 2))


@pytest.mark.parametrize("resume_at", [0, 1, 150, 196, 300])
def test_resume_gives_same_masks_as_uninterrupted(resume_at):
    total = 391
    torch.manual_seed(1)
    ref = _model(8)
    run = copy.deepcopy(ref)
    ref_cond = Condenser(ref, total)
    for t in range(total + 1):
        ref_cond.step(t)
        with torch.no_grad():  # weights change during training
            for p in ref.parameters():
                p.add_(torch.sin(p * (t + 1)) * 0.01)
    cond = Condenser(run, total)
    for t in range(resume_at + 1):
        cond.step(t)
        with torch.no_grad():
            for p in run.parameters():
                p.add_(torch.sin(p * (t + 1)) * 0.01)
    resumed = copy.deepcopy(run)  # what a checkpoint would carry
    cond = Condenser(resumed, total)
    cond.verify(resume_at)
    for t in range(resume_at + 1, total + 1):
        cond.step(t)
        with torch.no_grad():
            for p in resumed.parameters():
                p.add_(torch.sin(p * (t + 1)) * 0.01)
    for (_, a), (_, b) in zip(ref_cond.layers, cond.layers):
        assert torch.equal(a.mask, b.mask)


def test_mismatched_checkpoint_is_a_clear_error():
    model = _model(4)
    Condenser(model, 100).step(100)
    with pytest.raises(ScheduleError, match="stage 3 but the schedule puts it at stage 1"):
        Condenser(model, 1000).verify(200)


def test_explicit_fractions_and_validation():
    assert fire_steps(3, 100, explicit=[0.1, 0.2, 0.3]) == [10, 20, 30]
    with pytest.raises(ScheduleError, match="give exactly 3"):
        fire_steps(3, 100, explicit=[0.1, 0.2])
    with pytest.raises(ScheduleError, match="increase"):
        fire_steps(2, 100, explicit=[0.3, 0.2])
    cfg = CondenseConfig(end_fraction=0.25)
    cond = Condenser(_model(2), 100, cfg)
    assert cond.final_step == 25


@pytest.mark.parametrize("fractions", [[0.1, 0.2, 0.3], [0.2, 0.2, 0.5], [0.1, 0.5, 1.0], [0.0, 0.4, 0.5],
                                       [0.3, 0.2, 0.5]])
def test_schedule_and_config_check_accept_the_same_fractions(fractions):
    """One rule (fractions_ok): the config check refuses exactly what the schedule refuses."""
    from cdnv2.engine import TrainConfig, validate_config
    from cdnv2.errors import ConfigError

    try:
        fire_steps(3, 100, explicit=fractions)
        schedule_ok = True
    except ScheduleError:
        schedule_ok = False
    cfg = TrainConfig()
    cfg.condense.lgc_fractions = fractions
    try:
        validate_config(cfg)
        config_ok = True
    except ConfigError:
        config_ok = False
    assert schedule_ok == config_ok == (fractions == [0.1, 0.2, 0.3])


def test_lasso_weight_and_switch_off():
    model = _model(4)
    cond = Condenser(model, 100, CondenseConfig(lasso_lambda=1e-3))
    expected = 1e-3 * model[0].lasso_penalty()
    torch.testing.assert_close(cond.lasso_penalty(), expected)
    assert cond.lasso_active(0) and cond.lasso_active(49)
    assert not cond.lasso_active(50)
    both = Condenser(model, 100, CondenseConfig(lasso_lambda=1.0, lasso_layers=["lgc", "sfr"]))
    torch.testing.assert_close(both.lasso_penalty(), model[0].lasso_penalty() + model[1].lasso_penalty())
    assert not Condenser(model, 100).lasso_active(0)


def test_ema_keeps_masks_binary_and_identical():
    model = cdnv2.create_model("cdnv2_tiny")
    ema = ModelEMA(model, decay=0.9)
    cond = Condenser(model, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(10):
        model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        cond.step(t + 1)
        ema.update(model)
    for (name, m), (_, e) in zip(cond.layers, Condenser(ema.module, 10).layers):
        assert torch.equal(m.mask, e.mask), name
        assert set(e.mask.unique().tolist()) <= {0.0, 1.0}
        assert int(e.stage) == int(m.stage)
    # weights are averaged, not copied
    w, we = model.features.init_conv.weight, ema.module.features.init_conv.weight
    assert not torch.equal(w, we)


def test_ema_warmup_ramps_decay():
    model = torch.nn.Linear(2, 2)
    ema = ModelEMA(model, decay=0.999, warmup=True)
    start = ema.module.weight.clone()
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay 0.1: mostly the new weights
    torch.testing.assert_close(ema.module.weight, 0.1 * start + 0.9)
    fixed = ModelEMA(model, decay=0.999)
    assert fixed.current_decay() == 0.999
    for _ in range(10_000):
        ema.updates += 1
    assert ema.current_decay() == 0.999
