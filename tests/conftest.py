import pytest
import torch

# One intra-op thread: on a small shared machine, OpenMP threads spinning against other
# processes make the in-process training tests several times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
