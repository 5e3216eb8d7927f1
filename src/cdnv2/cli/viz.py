"""cdnv2-viz: draw a checkpoint's learned connectivity and a run's training curves.

    cdnv2-viz run_dir=runs/cdnv2_tiny-shapes          # curves + connectivity of its last.pt
    cdnv2-viz checkpoint=runs/cdnv2_tiny-shapes/model_compact.pt out=plots/
    cdnv2-viz checkpoint=cdnv2_c.pth.tar official=cdnv2_c reduce=mean

Writes ``connectivity.png`` (+ ``connectivity.json`` with the matrices) and
``curves.png``. matplotlib is the optional extra ``cdnv2[viz]``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import open_checkpoint
from ..engine.run_dir import check_not_run_file, check_writable
from ..errors import CheckpointError, ConfigError
from ..viz import REDUCTIONS, VizError, block_connectivity, plot_connectivity, plot_curves, read_metrics
from .common import make_main, run_user_command

PROG = "cdnv2-viz"


@dataclass
class VizConfig:
    """cdnv2-viz's options (the Hydra schema of configs/viz.yaml)."""

    checkpoint: Optional[str] = None  # masked checkpoint, compact artifact or official file
    run_dir: Optional[str] = None  # cdnv2-train run directory
    official: Optional[str] = None  # official file: its variant
    weights: str = "auto"  # auto | ema | raw
    reduce: str = "any"  # any | mean over groups
    out: Optional[str] = None  # output folder


ConfigStore.instance().store(name="viz_schema", node=VizConfig)


def _run_checkpoint(run_dir: Path) -> Optional[Path]:
    for name in ("checkpoints/last.pt", "model_compact.pt", "checkpoints/best.pt"):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def run(cfg: VizConfig) -> dict[str, str]:
    """Draw what ``cfg`` asks for; returns {picture name: path}."""
    if not cfg.checkpoint and not cfg.run_dir:
        raise ConfigError(
            "give checkpoint=PATH (connectivity heatmaps) and/or run_dir=PATH (training curves, "
            "plus the connectivity of the run's last checkpoint)"
        )
    if cfg.reduce not in REDUCTIONS:
        raise ConfigError(f"reduce={cfg.reduce!r}: use one of {', '.join(REDUCTIONS)}")
    run_dir = Path(cfg.run_dir).expanduser() if cfg.run_dir else None
    if run_dir is not None and not run_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir} is not a directory")
    checkpoint = Path(cfg.checkpoint).expanduser() if cfg.checkpoint else (run_dir and _run_checkpoint(run_dir))
    if cfg.out:
        out = Path(cfg.out).expanduser()
    elif run_dir is not None:
        out = run_dir / "plots"
    else:
        out = checkpoint.parent
    # Read everything first, then check the outputs: a refused command creates no folder.
    series = read_metrics(run_dir / "metrics.jsonl") if run_dir is not None else None
    loaded = open_checkpoint(checkpoint, weights=cfg.weights, official_name=cfg.official) if checkpoint else None
    for name in ("curves.png", "connectivity.png", "connectivity.json"):  # e.g. out=<run>/.hydra
        check_not_run_file(out / name, "out")
    check_writable(out, "output folder", "choose another place with out=PATH")
    written: dict[str, str] = {}

    if series is not None:
        written["curves"] = str(plot_curves(series, out / "curves.png", title=f"{run_dir.name}: training curves"))
    if loaded is not None:
        blocks = block_connectivity(loaded.model, cfg.reduce)
        stem = "connectivity"
        title = (f"{loaded.model_name} ({loaded.structure}): fraction of each source's channels that a "
                 f"layer reads (LGC) and rewrites (SFR), reduce={cfg.reduce}")
        written["connectivity"] = str(plot_connectivity(blocks, out / f"{stem}.png", title=title))
        (out / f"{stem}.json").write_text(json.dumps({
            "checkpoint": str(checkpoint), "model": loaded.model_name, "structure": loaded.structure,
            "reduce": cfg.reduce, "blocks": [b.as_dict() for b in blocks],
        }, indent=1) + "\n")
        written["connectivity_json"] = str(out / f"{stem}.json")
    elif run_dir is not None:
        print(f"{PROG}: {run_dir} has no checkpoint yet; drew the curves only", file=sys.stderr)
    for name, path in written.items():
        print(f"{name}: {path}", flush=True)
    return written


def _run(cfg: DictConfig) -> None:
    viz_cfg: VizConfig = OmegaConf.to_object(cfg)
    run_user_command(PROG, lambda: run(viz_cfg), (VizError, CheckpointError))


main = make_main(PROG, "viz", _run)


if __name__ == "__main__":
    main()
