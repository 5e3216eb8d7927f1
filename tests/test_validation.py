"""validate_config: every bad value stops up front with one paragraph (exit 2), nothing else."""
from __future__ import annotations

import dataclasses
import logging
import math
import typing

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdnv2.data import DataConfig, DataError
from cdnv2.engine import TrainConfig, Trainer, TrainerConfig
from cdnv2.engine.validation import model_facts, validate_config
from cdnv2.errors import CheckpointError, ConfigError, UserError

from helpers import QUICK, cli, restored_process_state


def _set(cfg: TrainConfig, key: str, value) -> TrainConfig:
    *path, leaf = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)
    return cfg


def _config(**values) -> TrainConfig:
    cfg = TrainConfig()
    for key, value in values.items():
        _set(cfg, key.replace("__", "."), value)
    return cfg


# ------------------------------------------------------------------ the cases of issue 11
CASES = [
    (dict(optim__lr=-1.0), "optim.lr=-1.0"),
    (dict(optim__lr=0.0), "optim.lr=0.0"),
    (dict(condense__end_fraction=1.5), "condense.end_fraction=1.5"),
    (dict(condense__end_fraction=0.0), "condense.end_fraction=0.0"),
    (dict(condense__lgc_fractions=[0.1]), "condense.lgc_fractions=[0.1]"),
    (dict(optim__name="adam"), "optim.name='adam'"),
    (dict(sched__name="exponential"), "sched.name='exponential'"),
    (dict(trainer__log_every=0), "trainer.log_every=0"),
    (dict(trainer__parity_samples=0), "trainer.parity_samples=0"),
    (dict(model__name="cdnv2_b", data__image_size=7), "data.image_size=7"),
    (dict(trainer__progress="foo"), "trainer.progress='foo'"),
    (dict(trainer__amp="fp16", trainer__device="cpu"), "trainer.amp='fp16'"),
    (dict(condense__lasso_layers=["foo"]), "condense.lasso_layers"),
    (dict(sched__warmup_epochs=-1.0), "sched.warmup_epochs=-1.0"),
    # and more of the same kind
    (dict(optim__lr=float("nan")), "optim.lr=nan"),
    (dict(trainer__epochs=0), "trainer.epochs=0"),
    (dict(trainer__nan_policy="ignore"), "trainer.nan_policy='ignore'"),
    (dict(trainer__device="gpu"), "trainer.device='gpu'"),
    (dict(trainer__ema_decay=1.0), "trainer.ema_decay=1.0"),
    (dict(trainer__max_steps_per_epoch=0), "trainer.max_steps_per_epoch=0"),
    (dict(trainer__threads=0), "trainer.threads=0"),
    (dict(sched__warmup_epochs=30.0, trainer__epochs=20), "sched.warmup_epochs=30.0"),
    (dict(sched__min_lr=1.0), "sched.min_lr=1.0"),
    (dict(model__lgc_condense=3), "model.lgc_condense=3"),
    (dict(model__stages=[2, 2]), "model.stages=[2, 2]"),
    (dict(model__name="cdnv2_bb"), "did you mean cdnv2_b"),
    (dict(model__name="densenet121", condense__sfr_fractions=[0.5]), "no SFR layers"),
    (dict(model__name="condensenet_50", condense__lasso_lambda=1e-5, condense__lasso_layers=["sfr"]),
     "condense.lasso_lambda=1e-05"),
    (dict(condense__lgc_fractions=[0.3, 0.2, 0.5]), "strictly increasing"),
    (dict(data__eval_resize=16), "data.eval_resize=16"),
    (dict(data__batch_size=0), "data.batch_size=0"),
    (dict(data__randaugment_magnitude=12.0), "data.randaugment_magnitude=12.0"),
    (dict(seed=-1), "seed=-1"),
    (dict(name="a/b"), "name='a/b'"),
    (dict(optim__lr="0.1"), "optim.lr='0.1' is not"),
    (dict(trainer__epochs=True), "trainer.epochs=True is not"),
    # issue 21: values that crashed or exhausted memory
    (dict(model__name="cdnv2_tiny", data__image_size=7), "data.image_size=7"),
    (dict(data__image_size=100000), "data.image_size=100000"),
    (dict(data__batch_size=10**9), "data.batch_size=1000000000"),
    (dict(data__eval_batch_size=10**9), "data.eval_batch_size=1000000000"),
    (dict(data__num_train=10**9, data__image_size=512), "data.num_train=1000000000"),
    (dict(model__bottleneck=10**20), "model.bottleneck=100000000000000000000"),
    (dict(model__growth=[100000, 100000, 100000]), "model.growth=[100000, 100000, 100000] has"),
]


@pytest.mark.parametrize("values,expected", CASES, ids=[c[1] for c in CASES])
def test_each_bad_value_is_a_config_error_naming_it(values, expected):
    with pytest.raises(ConfigError) as info:
        validate_config(_config(**values))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message and len(message) < 600  # one paragraph
    assert any(f"{verb} " in message.lower() for verb in ("use", "set", "give", "choose", "remove", "list", "lower"))


def test_missing_resume_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        validate_config(_config(resume=str(tmp_path / "nope.pt")))


def test_defaults_and_sensible_values_pass():
    validate_config(TrainConfig())
    validate_config(_config(trainer__amp="bf16", trainer__device="cpu"))  # bf16 autocast works on CPUs
    validate_config(_config(model__name="cdnv2_b", data__image_size=32))
    validate_config(_config(condense__lgc_fractions=[0.1, 0.2, 0.3], condense__sfr_fractions=[0.2, 0.3, 0.4]))
    validate_config(_config(model__name="densenet121", data__image_size=224, condense__lasso_lambda=0.0))


def test_shipped_configs_validate():
    from hydra import compose, initialize_config_module

    from omegaconf import OmegaConf

    from cdnv2.cli import train as train_cli  # noqa: F401  (registers the schema)

    with initialize_config_module("cdnv2.configs", version_base="1.3"):
        runs = [["data=imagenet", "model=cdnv2_b", "data.root=/x"], ["data=cifar10", "model=condensenet_86"],
                ["data=imagefolder", "data.root=/x", "model=condensenet_74_c4"], ["experiment=quick"],
                ["model=densenet121"]]
        for overrides in runs:
            validate_config(OmegaConf.to_object(compose("train", overrides=overrides)))


def test_model_facts_from_the_architecture():
    assert model_facts("cdnv2_b", {}).downsampling == 32
    assert model_facts("cdnv2_tiny", {}).downsampling == 4
    assert model_facts("cdnv2_tiny", {"stem_stride": 2}).downsampling == 8
    assert model_facts("densenet121", {}).downsampling == 32
    assert model_facts("cdnv2_b", {}).condense_steps == {"lgc": 5, "sfr": 5}
    assert model_facts("condensenet_74_c4", {}).condense_steps == {"lgc": 3, "classifier": 1}


def test_validation_leaves_rngs_alone():
    state = torch.get_rng_state()
    validate_config(_config(model__name="cdnv2_c", model__lgc_groups=4, model__lgc_condense=4))
    assert torch.equal(state, torch.get_rng_state())


def test_data_errors_are_user_errors():
    assert issubclass(DataError, UserError) and issubclass(ConfigError, UserError)


# ------------------------------------------------------------------ properties
def _leaves(schema, prefix=""):
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, tp


LEAVES = dict(_leaves(TrainConfig))
_NUMBERS = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 7, 1000, 10**20, -(10**20)]),
    st.integers(-5, 300),
    st.sampled_from([0.0, -0.5, 0.5, 1.0, 1.5, 1e-12, -1e-12, 1e30, float("nan"), float("inf"), float("-inf")]),
    st.floats(-3, 3, allow_nan=False),
)
_NAMES = st.sampled_from(["sgd", "adam", "cosine", "step", "auto", "cpu", "cuda", "cuda:7", "gpu", "none",
                          "bf16", "fp16", "fp64", "bar", "lines", "foo", "raise", "skip", "lgc", "sfr",
                          "shapes", "imagefolder", "never", "cdnv2_b", "cdnv2_tiny", "bilinear"])
_ODD = st.one_of(st.sampled_from(["", " ", "null", "true", "1e3", "[]", "a/b", "..", "\t", "é€", "x" * 300]),
                 st.text(max_size=8))
_VALUES = st.one_of(
    st.none(), st.booleans(), _NUMBERS, _NAMES, _ODD,
    st.lists(st.one_of(_NUMBERS, _NAMES), max_size=4),
)


def _typed(tp) -> st.SearchStrategy:
    """Values of the key's own type (in and out of range), so most draws get past Hydra."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return st.one_of(*(st.none() if a is type(None) else _typed(a) for a in args))
    if origin is list:
        return st.lists(_typed(args[0]), max_size=4)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.sampled_from([0, 1, -1, 2, 7, 10**20]), st.integers(-5, 300))
    if tp is float:
        return _NUMBERS
    return st.one_of(_NAMES, _ODD)


@st.composite
def _assignments(draw):
    keys = draw(st.lists(st.sampled_from(sorted(LEAVES)), min_size=1, max_size=3, unique=True))
    # Three in four values have the key's type; the rest are anything (wrong types).
    return {k: draw(st.one_of(_typed(LEAVES[k]), _typed(LEAVES[k]), _typed(LEAVES[k]), _VALUES)) for k in keys}


@given(_assignments())  # examples and randomness: the Hypothesis profile (tests/conftest.py)
@example({"model.bottleneck": 10**20})  # once a multi-line torch C++ message
@example({"data.image_size": 100000})  # once a 2.5 TB allocation
def test_any_python_values_are_accepted_or_a_user_error(values):
    """Python users bypass Hydra's type checks: validation must still answer with a UserError."""
    cfg = TrainConfig()
    for key, value in values.items():
        _set(cfg, key, value)
    try:
        validate_config(cfg)
    except UserError as e:
        assert str(e) and "\n" not in str(e)


def _render(value) -> str:
    """A Python value as Hydra override syntax."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_render(v) for v in value) + "]"
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def test_hydra_overrides_are_accepted_or_a_user_error():
    """Overrides drawn from the schema: Hydra rejects a wrong type at composition (its own
    error, naming the key); whatever composes is accepted or answered with a UserError."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from cdnv2.cli import train as train_cli  # noqa: F401  (registers the schema)

    outcomes = {"composition": 0, "accepted": 0, "user error": 0}

    # Each composition takes a while: 40 examples (in the default profile) keep this to seconds.
    @settings(max_examples=settings.default.max_examples * 2 // 5)
    @given(_assignments(), st.sampled_from([[], ["model=cdnv2_b"], ["model=condensenet_50"], ["data=cifar10"]]))
    def check(values, groups):
        overrides = groups + [f"{k}={_render(v)}" for k, v in values.items()]
        try:
            cfg = OmegaConf.to_object(compose("train", overrides=overrides))
        except (HydraException, OmegaConfBaseException):
            outcomes["composition"] += 1
            return
        try:
            validate_config(cfg)
            outcomes["accepted"] += 1
        except UserError:
            outcomes["user error"] += 1

    with initialize_config_module("cdnv2.configs", version_base="1.3"):
        check()
    print(outcomes)
    assert outcomes["user error"] > 0 and outcomes["composition"] > 0, outcomes


# ------------------------------------------------------------------ the trainer and the command
def test_trainer_validates_and_logs_what_it_will_do(tmp_path, caplog):
    cfg = TrainConfig(data=DataConfig(num_train=64, num_val=32, batch_size=16))
    cfg.trainer = TrainerConfig(epochs=2, parity_samples=0, progress="none")
    with pytest.raises(ConfigError, match="trainer.parity_samples=0"):
        Trainer(cfg, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    cfg.trainer = TrainerConfig(epochs=2, progress="none", amp="bf16", device="cpu")
    with caplog.at_level(logging.INFO, logger="cdnv2"):
        trainer = Trainer(cfg, tmp_path / "run")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("run "))
    assert "64 train / 32 val images, 10 classes" in line and str(tmp_path / "run") in line
    assert "lr 0.025" in line and "8 steps (2 epochs x 4)" in line
    assert "lgc at steps [2, 3, 4]" in line and "sfr at steps [2, 3, 4]" in line
    assert trainer.autocast_dtype == torch.bfloat16  # bf16 on CPU is used, not ignored
    images, targets = next(iter(trainer.data.train_loader))
    trainer.train_step(images, targets)
    window = trainer.health.collect()  # the step's loss, looked at as the log would
    assert window.good == 1 and not window.bad_steps and math.isfinite(window.loss)


# The command's own error path: one case through the real command (each start costs
# seconds), the others in-process (compose, then run as the command runs it); the
# in-process table above covers every case.
def test_command_exits_2_before_the_run_dir_exists(tmp_path):
    run_dir = tmp_path / "run"
    r = cli("cdnv2-train", *QUICK, "optim.lr=-1", "trainer.log_every=0", f"hydra.run.dir={run_dir}", timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cdnv2-train: error: ") and "optim.lr=-1.0" in lines[0], r.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides,expected", [
    (["model=cdnv2_tiny", "data.image_size=7"], "data.image_size=7"),  # once make_shapes' ValueError
    (["trainer.amp=fp16", "trainer.device=cpu"], "trainer.amp='fp16' needs a CUDA device"),
])
def test_run_exits_2_with_one_paragraph_before_any_work(tmp_path, capsys, overrides, expected):
    from cdnv2.cli.common import run_user_command
    from cdnv2.cli.train import compose_train_config, run_command

    run_dir = tmp_path / "run"
    cfg = compose_train_config([*QUICK, *overrides])
    with restored_process_state(), pytest.raises(SystemExit) as e:
        run_user_command("cdnv2-train", lambda: run_command(cfg, str(run_dir)))
    assert e.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cdnv2-train: error: ") and expected in lines[0], lines
    assert not run_dir.exists()
