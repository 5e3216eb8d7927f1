"""When and what to prune; group lasso; mask-safe EMA. Works on any module tree."""
from .ema import ModelEMA
from .schedule import (
    LASSO_LAYERS,
    CondenseConfig,
    CondenseEvent,
    Condenser,
    ScheduleError,
    condense_fully,
    condensing_layers,
    fire_steps,
    fractions_ok,
    layer_kind,
    step_fractions,
)

__all__ = [
    "LASSO_LAYERS",
    "CondenseConfig",
    "CondenseEvent",
    "Condenser",
    "ModelEMA",
    "ScheduleError",
    "condense_fully",
    "condensing_layers",
    "fire_steps",
    "fractions_ok",
    "layer_kind",
    "step_fractions",
]
