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
