import pytest
import torch

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
