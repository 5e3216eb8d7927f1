import pytest
import torch

# One intra-op thread: on a small shared machine, OpenMP threads spinning against other
# processes make the in-process training tests several times slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
