import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests: the same examples on every run by default (`make test`, CI), so a
# submission never fails on an unrelated random draw; `make test-all` sets
# HYPOTHESIS_PROFILE=thorough for a ten times larger random search.
settings.register_profile("ci", derandomize=True, max_examples=100, deadline=None, database=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", derandomize=False, max_examples=1000, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# One intra-op thread: on a small shared machine, OpenMP threads spinning against other
# processes make the in-process training tests several times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_folder_run(tmp_path_factory):
    """One tiny cdnv2_tiny run on a generated ImageFolder, trained once per test session:
    (run folder, data root). Treat both as read-only."""
    from helpers import FOLDER_QUICK, make_image_folder, run_like_cli

    data = make_image_folder(tmp_path_factory.mktemp("folder_data"))
    run = tmp_path_factory.mktemp("folder_run")
    run_like_cli(run, *FOLDER_QUICK, f"data.root={data}")
    return run, data


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One in-process cdnv2_tiny run on the shapes data (384/128 images, 2 epochs of 4 steps,
    EMA weights, every step logged, stage snapshots), with the runtime cdnv2-train sets up:
    its run folder, read by the deployment, eval and viz tests. Treat it as read-only."""
    from cdnv2.data import DataConfig
    from cdnv2.engine import TrainConfig, TrainerConfig, configure_runtime, train
    from helpers import TINY_DATA, restored_process_state

    cfg = TrainConfig(data=DataConfig(**TINY_DATA))
    cfg.trainer = TrainerConfig(epochs=2, max_steps_per_epoch=4, parity_samples=8, progress="none",
                                ema_decay=0.9, log_every=1, threads=1)
    path = tmp_path_factory.mktemp("tiny_run")
    with restored_process_state():
        configure_runtime("cpu", deterministic=cfg.trainer.deterministic, threads=1, seed=cfg.seed)
        train(cfg, path)
    return path


@pytest.fixture(scope="session")
def quick_cli_run(tmp_path_factory):
    """One finished ``cdnv2-train <QUICK>`` run for the whole session; tests that change
    anything copy it first. Its last.pt holds the weights every interrupted QUICK run must
    end with (an in-process run ends with the same ones)."""
    from helpers import QUICK, cli

    run = tmp_path_factory.mktemp("quick") / "run"
    r = cli("cdnv2-train", *QUICK, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    return run
