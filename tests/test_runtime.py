"""Process-wide settings: only configure_runtime changes them; the library leaves them alone."""
import os
from pathlib import Path

import pytest
import torch

from cdnv2.engine import Callback, configure_runtime, resolve_device, train
from cdnv2.errors import ConfigError, DataError, ScheduleError, UserError

from helpers import quick_config, restored_process_state


def test_training_in_process_leaves_global_state_alone(tmp_path):
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cfg = quick_config(threads=threads + 1, deterministic="true")
    cfg.trainer.epochs = 1
    cfg.seed = 7

    class Seen(Callback):
        def on_fit_start(self, trainer):
            self.threads = torch.get_num_threads()

    seen = Seen()
    train(cfg, tmp_path, callbacks=[seen])
    assert seen.threads == threads  # trainer.threads is the CLI's to apply, not the trainer's
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det


def test_same_seed_same_initial_weights_whatever_the_global_rng(tmp_path):
    cfg = quick_config()
    cfg.trainer.epochs = 1
    cfg.trainer.max_steps_per_epoch = 1
    states = []
    for i, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)
        train(cfg, tmp_path / str(i))
        states.append(torch.load(tmp_path / str(i) / "checkpoints/last.pt", weights_only=True)["model_state"])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_configure_runtime_on_cpu():
    with restored_process_state():
        note = configure_runtime("cpu", deterministic="auto", threads=1, seed=3)
        assert "exact resume" in note
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
        a = torch.rand(3)
        configure_runtime("cpu", deterministic=True, seed=3)  # YAML/old-checkpoint booleans
        assert torch.equal(torch.rand(3), a)
        configure_runtime("cpu", deterministic="false")
        assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        (dict(deterministic="maybe"), "trainer.deterministic='maybe': use auto"),
        (dict(device="tpu"), "trainer.device='tpu': use auto, cpu, cuda or cuda:N"),
        (dict(threads=0), "trainer.threads=0 must be >= 1"),
    ],
)
def test_configure_runtime_rejects_bad_values(kwargs, expected):
    with restored_process_state(), pytest.raises(ConfigError) as e:
        configure_runtime(**{"device": "cpu", **kwargs}, key="trainer.")
    assert expected in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_resolve_device_without_cuda():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available; use device=cpu"):
        resolve_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_configure_runtime_on_cuda(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with restored_process_state():
        configure_runtime("cuda", deterministic="auto")
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        configure_runtime("cuda", deterministic="true")
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_user_errors_share_one_base():
    for error in (ConfigError, DataError, ScheduleError):
        assert issubclass(error, UserError)


def test_no_test_hooks_in_the_product():
    src = Path(__file__).resolve().parent.parent / "src"
    offenders = [str(p) for p in src.rglob("*.py") if "CDNV2_TEST_" in p.read_text()]
    assert not offenders
