"""Rank and world size come from torchrun's complete environment or not at all: a partial
one is exit 2 naming the variables, before the run folder exists."""
import pytest

from cdnv2.engine.distributed import DistInfo, distributed_env
from cdnv2.errors import ConfigError

from helpers import QUICK, cli

TORCHRUN = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
UNSET = {v: "" for v in TORCHRUN}  # what the tests' own environment might hold


def test_complete_or_absent_environments():
    assert distributed_env({}) == DistInfo()
    assert distributed_env({"MASTER_ADDR": "h", "MASTER_PORT": "1"}) == DistInfo()  # decide nothing
    assert distributed_env(TORCHRUN) == DistInfo(rank=1, world_size=2, local_rank=1)
    assert distributed_env(dict(RANK="0", WORLD_SIZE="1")) == DistInfo()  # one process needs no group


@pytest.mark.parametrize("env, named", [
    (dict(RANK="1"), "WORLD_SIZE"),
    (dict(WORLD_SIZE="2"), "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
    (dict(LOCAL_RANK="0"), "RANK, WORLD_SIZE"),
    (dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1"), "MASTER_ADDR, MASTER_PORT"),
    (dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="1"), "LOCAL_RANK"),
])
def test_partial_environments_name_what_is_missing(env, named):
    with pytest.raises(ConfigError, match=rf"incomplete distributed environment: .* but {named} (is|are) not"):
        distributed_env(env)


@pytest.mark.parametrize("change", [dict(RANK="2"), dict(RANK="-1"), dict(LOCAL_RANK="5"), dict(WORLD_SIZE="0"),
                                    dict(MASTER_PORT="http"), dict(RANK="one")])
def test_inconsistent_values_are_refused(change):
    with pytest.raises(ConfigError, match="RANK|WORLD_SIZE|MASTER_PORT"):
        distributed_env({**TORCHRUN, **change})


@pytest.mark.parametrize("env, named", [
    (dict(RANK="1"), "WORLD_SIZE"),  # once: skipped the lock, trained and wrote as the main process
    pytest.param(dict(WORLD_SIZE="2"), "RANK", marks=pytest.mark.slow),  # once: KeyError: 'RANK'
])
def test_the_command_refuses_a_partial_environment_up_front(tmp_path, env, named):
    run = tmp_path / "run"
    r = cli("cdnv2-train", *QUICK, f"hydra.run.dir={run}", env={**UNSET, **env})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert f"is set but {named}" in r.stderr and "torchrun" in r.stderr
    assert not run.exists()  # checked before Hydra made the folder
