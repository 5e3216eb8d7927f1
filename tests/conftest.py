import pytest
import torch

# Two cores: keep intra-op threads predictable so tests do not fight each other.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
