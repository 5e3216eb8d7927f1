"""The GPU training path, checked on CPU: foreach EMA, device-side skipping, AMP, gpu_check."""
import copy
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cdnv2
from cdnv2.condense import ModelEMA, condensing_layers
from cdnv2.compact import to_compact_training
from cdnv2.data import DataConfig
from cdnv2.engine import TrainConfig, Trainer, TrainerConfig, train
from cdnv2.engine.runtime import resolve_compact_training

from helpers import assert_same_state, load

ROOT = Path(__file__).resolve().parents[1]


def _loop_ema_update(ema_state: dict, model, decay: float) -> None:
    """The previous ModelEMA.update: a state_dict walk and one lerp_ or copy_ per tensor."""
    averaged = {n for n, _ in model.named_parameters()}
    averaged |= {n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var"))}
    live = model.state_dict()
    for name, value in ema_state.items():
        if name in averaged and value.is_floating_point():
            value.lerp_(live[name], 1.0 - decay)
        else:
            value.copy_(live[name])


def _perturb(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for n, b in model.named_buffers():
            if n.endswith("running_mean"):
                b.add_(0.05)


def test_foreach_ema_equals_the_loop_through_condensation_and_compact_swap():
    model = cdnv2.create_model("cdnv2_tiny")
    ema = ModelEMA(model, 0.9, warmup=True)
    ref = copy.deepcopy(ema.module)
    gated = ModelEMA(model, 0.9, warmup=True)
    one = torch.ones(())

    def both(n):
        for _ in range(n):
            _perturb(model)
            decay = ema.current_decay()
            ema.update(model)
            gated.update(model, apply=one)
            _loop_ema_update(ref.state_dict(), model, decay)

    both(2)
    for _, m in condensing_layers(model):
        m.condense_step()
    ema.sync_structure(model)
    gated.sync_structure(model)
    both(2)
    for _, m in condensing_layers(model):
        while not m.fully_condensed:
            m.condense_step()
    for e in (ema, gated):
        e.sync_structure(model)
    both(1)  # the loop copies the final masks into ref on its update
    masks = [v for k, v in gated.state_dict().items() if k.endswith("mask")]
    assert masks and all(set(m.unique().tolist()) <= {0.0, 1.0} for m in masks)  # copied, never averaged
    assert_same_state(gated.state_dict(), gated.state_dict() | {k: v for k, v in ref.state_dict().items()
                                                                 if k.endswith("mask")})
    to_compact_training(model)
    to_compact_training(ref)
    for e in (ema, gated):
        to_compact_training(e.module)
        e.sync_structure(model)  # new modules: the cached lists must follow them
    both(2)
    assert_same_state(ema.state_dict(), ref.state_dict())  # scalar lerp: bit for bit
    for k, v in gated.state_dict().items():
        assert torch.allclose(v.double(), ref.state_dict()[k].double(), rtol=0, atol=1e-6), k
    assert ema.updates == gated.updates == 7


def test_gated_ema_update_with_apply_zero_changes_nothing():
    model = cdnv2.create_model("cdnv2_tiny")
    ema = ModelEMA(model, 0.99, warmup=True)
    ema.update(model, apply=torch.ones(()))
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    _perturb(model)
    ema.update(model, apply=torch.zeros(()))
    for k, v in ema.state_dict().items():
        if v.is_floating_point() and not k.endswith("mask"):
            assert torch.equal(v, before[k]), k
    assert ema.updates == 1


def _config(**trainer) -> TrainConfig:
    cfg = TrainConfig(data=DataConfig(num_train=96, num_val=32, batch_size=16), resume="never")
    cfg.trainer = TrainerConfig(epochs=2, max_steps_per_epoch=3, parity_samples=4, progress="none",
                                threads=1, ema_decay=0.9, **trainer)
    return cfg


def _nan_at(monkeypatch, steps: set[int]) -> None:
    forward = Trainer._forward_loss

    def poisoned(self, images, targets):
        loss = forward(self, images, targets)
        return loss * float("nan") if self.step + 1 in steps else loss

    monkeypatch.setattr(Trainer, "_forward_loss", poisoned)


def _host_skip_at(monkeypatch, steps: set[int]) -> None:
    """Reference: at these steps run the forward (BN statistics move) and nothing else."""
    step = Trainer.train_step

    def skipping(self, images, targets):
        if self.step + 1 in steps:
            self._forward_loss(images, targets)
            return
        step(self, images, targets)

    monkeypatch.setattr(Trainer, "train_step", skipping)


def test_nan_policy_skip_skips_exactly_the_bad_steps(tmp_path, monkeypatch):
    bad = {2, 5}  # one in the masked half, one after the compact-training swap (step 3)
    with monkeypatch.context() as m:
        _nan_at(m, bad)
        report = train(_config(nan_policy="skip"), tmp_path / "nan")
    with monkeypatch.context() as m:
        _host_skip_at(m, bad)
        train(_config(), tmp_path / "ref")
    a, b = load(tmp_path / "nan/checkpoints/last.pt"), load(tmp_path / "ref/checkpoints/last.pt")
    assert report["steps"] == 6 and a["bad_steps"] == 2 and a["structure"] == "compact_train"
    assert_same_state(a["model_state"], b["model_state"])
    assert_same_state(a["ema_state"], b["ema_state"])
    assert a["ema_updates"] == b["ema_updates"] == 4
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


_SYNCS = ("__bool__", "__float__", "__int__", "item", "tolist")


def test_steady_state_step_reads_nothing_back(tmp_path, monkeypatch):
    """No Python-level device read (the host syncs on a GPU) in train_step/after_step/_check_stop,
    in the masked form and in the compact-training form."""
    cfg = _config(nan_policy="skip", log_every=1000)
    cfg.trainer.epochs = 40  # condensation steps at 20, 40, 60 of 120: steps 2-4 are steady
    trainer = Trainer(cfg, tmp_path)
    images, targets = next(iter(trainer.data.train_loader))

    def step():
        trainer.train_step(images, targets)
        trainer.after_step()
        trainer._check_stop()

    def forbidden(*_args, **_kw):
        raise AssertionError("host read of a tensor inside the training step")

    step()  # step 1 primes the optimizer state
    for form in ("masked", "compact_train"):
        with monkeypatch.context() as m:
            for name in _SYNCS:
                m.setattr(torch.Tensor, name, forbidden)
            step()
            step()
        assert trainer.structure == form
        while trainer.structure == "masked":
            step()
    window = trainer._collect_health()
    assert window.bad_steps == [] and window.loss is not None


def _allow_fp16_on_cpu(monkeypatch) -> None:
    """Users get fp16 on CUDA only (validation); the GradScaler logic itself runs on CPU too."""
    monkeypatch.setattr("cdnv2.engine.trainer.validate_config", lambda cfg: None)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_training_steps_on_cpu_masked_and_compact(tmp_path, monkeypatch, precision):
    _allow_fp16_on_cpu(monkeypatch)
    cfg = _config(amp=precision, compact_training="true")
    trainer = Trainer(cfg, tmp_path)
    assert (trainer.scaler is not None) == (precision == "fp16")
    loader = itertools.cycle(trainer.data.train_loader)
    for _ in range(cfg.trainer.epochs * 3):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train_step(*next(loader))
        params = list(trainer.model.parameters())
        assert all(p.dtype == torch.float32 for p in params)
        assert all(p.grad is not None for p in params if p.requires_grad)
        if precision == "bf16":  # fp16: the scaler may skip early steps (overflow), by design
            assert all(torch.isfinite(p.grad).all() for p in params if p.requires_grad)
            assert any(not torch.equal(p, q) for p, q in zip(params, before))
        trainer.after_step()
    assert trainer.structure == "compact_train"  # both forms ran
    if trainer.scaler is not None:
        assert 0 < trainer.scaler.get_scale() < float("inf")
    window = trainer._collect_health()
    assert window.bad_steps == [] and window.loss is not None and window.loss == window.loss


def test_fp16_scaler_skips_a_bad_step_exactly(tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2})
    _allow_fp16_on_cpu(monkeypatch)
    trainer = Trainer(_config(amp="fp16", nan_policy="skip"), tmp_path)
    loader = iter(trainer.data.train_loader)
    trainer.train_step(*next(loader))
    trainer.after_step()
    params = [p.detach().clone() for p in trainer.model.parameters()]
    ema = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    trainer.train_step(*next(loader))
    for p, q in zip(trainer.model.parameters(), params):
        assert torch.equal(p, q)
    for k, v in trainer.ema.state_dict().items():
        if v.is_floating_point() and "running" not in k:
            assert torch.equal(v, ema[k]), k
    trainer.after_step()  # a condensation step: its snapshot save already looks at the flags
    trainer._collect_health()
    assert trainer.bad_steps == 1


def test_compact_training_auto_per_device():
    assert resolve_compact_training("auto", torch.device("cpu")) is True
    assert resolve_compact_training("auto", torch.device("cuda")) is False
    assert resolve_compact_training(True, torch.device("cuda")) is True
    assert resolve_compact_training("false", torch.device("cpu")) is False


_NO_HYDRA = (
    "import sys, runpy\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('hydra', 'omegaconf'):\n"
    "            raise ImportError('blocked: ' + name)\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_library_and_engine_import_without_hydra():
    """Only cli/ imports Hydra (the full check script below, slow, also trains without it)."""
    code = _NO_HYDRA + "import cdnv2, cdnv2.engine, cdnv2.checkpoint, cdnv2.evaluate, cdnv2.viz\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # a minute of CPU; the GPU check runs it on the device
def test_gpu_check_runs_on_cpu_without_hydra():
    """The check script on small sizes, with hydra and omegaconf made unimportable."""
    block = _NO_HYDRA + (
        "sys.argv = ['gpu_check.py', '--quick', '--device', 'cpu']\n"
        f"runpy.run_path({str(ROOT / 'scripts/gpu_check.py')!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "| train img/s, EMA on | cdnv2_tiny | masked |" in out
    assert "| train img/s, EMA on | cdnv2_tiny | compact_train |" in out
    assert "inference compact/masked | cdnv2_tiny | batch 1 |" in out
    assert "quickstart" in out and "parity" in out
