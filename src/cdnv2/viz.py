"""Pictures of a model and a run: layer-level connectivity and training curves.

The numbers come from pure functions (:func:`connectivity_matrix`,
:func:`block_connectivity`, :func:`read_metrics`); the drawing functions only plot
them. matplotlib is an optional extra (``pip install 'cdnv2[viz]'``) imported on use.

Connectivity (the paper's layer-level weight figure). In a dense block the input of
layer ``t`` (1-based) is ``[block input, output of layer 1, ..., output of layer t-1]``.
For each target layer ``t`` and source ``s`` (0 = the block input):

- LGC ("reads"): the fraction of source ``s``'s channels that layer ``t``'s learned
  group conv keeps, counting a channel once if any group keeps it (``reduce="any"``)
  or averaging each group's kept fraction (``reduce="mean"``).
- SFR ("rewrites"): the fraction of source ``s``'s channels that layer ``t``'s sparse
  feature reactivation writes to (same two reductions over its groups).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .compact.fold import dense_blocks
from .errors import UserError
from .layers import LearnedGroupConv, SparseFeatureReactivation

REDUCTIONS = ("any", "mean")


class VizError(UserError):
    """Nothing to draw, or the plotting extra is missing."""


# ----------------------------------------------------------------------------- numbers
def connectivity_matrix(
    group_masks: Sequence[Optional[torch.Tensor]], block_in: int, growth: int, reduce: str = "any"
) -> torch.Tensor:
    """(n, n) matrix ``m[t-1, s]`` for the ``n`` layers of one dense block.

    ``group_masks[t-1]`` is a bool (G, c_t) tensor: which of layer t's ``c_t = block_in +
    (t-1) * growth`` input-side channels each group connects to (None: the layer has no
    such connection, e.g. no SFR; its row is NaN). Entries with ``s >= t`` are NaN.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r}: use one of {', '.join(REDUCTIONS)}")
    n = len(group_masks)
    out = torch.full((n, n), math.nan, dtype=torch.float64)
    for t, gm in enumerate(group_masks):  # t: 0-based target layer
        if gm is None:
            continue
        width = block_in + t * growth
        if gm.dim() != 2 or gm.shape[1] != width:
            raise ValueError(
                f"layer {t + 1}: group mask of shape {tuple(gm.shape)}, expected (groups, {width}) "
                f"for block input {block_in} and growth {growth}"
            )
        gm = gm.bool()
        per_channel = gm.any(0).double() if reduce == "any" else gm.double().mean(0)
        bounds = [0, block_in] + [block_in + (j + 1) * growth for j in range(t)]
        for s in range(t + 1):
            out[t, s] = per_channel[bounds[s]:bounds[s + 1]].mean()
    return out


def _index_group_mask(index: torch.Tensor, groups: int, channels: int) -> torch.Tensor:
    """(G, channels) bool mask from a compact layer's index (group 0's picks, then 1's ...)."""
    rows = index.long().view(groups, -1)
    gm = torch.zeros(groups, channels, dtype=torch.bool)
    gm.scatter_(1, rows.cpu(), True)
    return gm


def lgc_group_mask(layer: nn.Module) -> Optional[torch.Tensor]:
    """(G, inputs) bool: the inputs each LGC group reads, masked or compact form."""
    if isinstance(layer, LearnedGroupConv):
        return layer.group_mask().cpu()
    for name in ("index", "train_index"):  # CompactLGC, CompactTrainLGC
        idx = getattr(layer, name, None)
        if isinstance(idx, torch.Tensor) and hasattr(layer, "groups") and hasattr(layer, "in_channels"):
            return _index_group_mask(idx, layer.groups, layer.in_channels)
    return None


def sfr_group_mask(layer: Optional[nn.Module]) -> Optional[torch.Tensor]:
    """(G, targets) bool: the earlier channels each SFR group rewrites."""
    if layer is None:
        return None
    if isinstance(layer, SparseFeatureReactivation):
        return layer.group_mask().cpu()
    idx = getattr(layer, "index", None)  # CompactSFR: produced channel r -> target index[r]
    if isinstance(idx, torch.Tensor) and hasattr(layer, "groups") and hasattr(layer, "out_channels"):
        return _index_group_mask(idx, layer.groups, layer.out_channels)
    return None


@dataclass
class BlockConnectivity:
    name: str  # module name of the dense block
    block_in: int  # channels entering the block
    growth: int  # channels each layer adds
    lgc: torch.Tensor  # (n, n) read fractions, NaN above the diagonal
    sfr: Optional[torch.Tensor]  # (n, n) rewrite fractions; None without SFR

    def as_dict(self) -> dict:
        def rows(m):
            return [[None if math.isnan(v) else round(v, 6) for v in r] for r in m.tolist()]

        return {
            "name": self.name, "block_in": self.block_in, "growth": self.growth,
            "lgc": rows(self.lgc), "sfr": rows(self.sfr) if self.sfr is not None else None,
        }


def block_connectivity(model: nn.Module, reduce: str = "any") -> list[BlockConnectivity]:
    """Connectivity matrices of every dense block of a CondenseNet(V2), masked or compact."""
    result = []
    for name, layers in dense_blocks(model):
        lgc = [lgc_group_mask(layer.conv_1) for layer in layers]
        if any(m is None for m in lgc):
            continue  # not a learned-group-conv block
        sfr = [sfr_group_mask(layer.sfr) for layer in layers]
        block_in = lgc[0].shape[1]
        growth = lgc[1].shape[1] - block_in if len(lgc) > 1 else _growth(layers[0])
        result.append(BlockConnectivity(
            name=name, block_in=block_in, growth=growth,
            lgc=connectivity_matrix(lgc, block_in, growth, reduce),
            sfr=connectivity_matrix(sfr, block_in, growth, reduce) if any(m is not None for m in sfr) else None,
        ))
    if not result:
        raise VizError(
            f"{type(model).__name__} has no dense blocks with learned group convolutions "
            "(only CondenseNet and CondenseNetV2 models have a learned connectivity to draw)"
        )
    return result


def _growth(layer: nn.Module) -> int:
    return int(layer.conv_2.conv.out_channels)


def read_metrics(path: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.jsonl -> {name: (steps, values)}, in file order; bad lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise VizError(f"{path} does not exist; a cdnv2-train run directory holds metrics.jsonl")
    series: dict[str, tuple[list[int], list[float]]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if not isinstance(row, dict) or "step" not in row:
            continue
        for name, value in row.items():
            if name in ("step", "epoch") or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(name, ([], []))
            steps.append(int(row["step"]))
            values.append(float(value))
    if not series:
        raise VizError(f"{path} holds no metrics yet")
    return series


# ----------------------------------------------------------------------------- drawing
def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise VizError(
            "drawing needs matplotlib, an optional extra: pip install 'cdnv2[viz]'"
        ) from None
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def color_range(blocks: list[BlockConnectivity]) -> tuple[float, float]:
    """The colour scale of the heatmaps: the data's own range (fractions of 0.56-0.75 would
    all look alike on 0-1), widened to at least 0.05 so equal values do not divide by 0."""
    values = torch.cat([m.flatten() for b in blocks for m in (b.lgc, b.sfr) if m is not None] or [torch.zeros(0)])
    values = values[~values.isnan()]
    if values.numel() == 0:
        return 0.0, 1.0
    lo, hi = float(values.min()), float(values.max())
    pad = max(0.0, 0.05 - (hi - lo)) / 2
    lo = max(0.0, lo - pad)
    return lo, max(hi + pad, lo + 0.05)


def robust_ylim(values: Sequence[float], whisker: float = 3.0) -> tuple[float, float] | None:
    """Y-limits that keep outliers (the loss spike right after a pruning step) from
    flattening the rest: the data's range cut at ``whisker`` inter-quartile ranges beyond
    the quartiles. None when nothing needs cutting."""
    finite = sorted(v for v in values if math.isfinite(v))
    if len(finite) < 4:
        return None
    q1, q3 = finite[len(finite) // 4], finite[(3 * len(finite)) // 4]
    spread = max(q3 - q1, 1e-12)
    lo, hi = max(finite[0], q1 - whisker * spread), min(finite[-1], q3 + whisker * spread)
    if lo == finite[0] and hi == finite[-1]:
        return None
    margin = 0.05 * (hi - lo or 1.0)
    return lo - margin, hi + margin


def condensation_steps(series: dict[str, tuple[list[int], list[float]]]) -> list[int]:
    """The steps at which a condensation stage fired (density is logged exactly then)."""
    return sorted({s for name, (steps, _) in series.items() if name.startswith("condense/density") for s in steps})


def plot_connectivity(blocks: list[BlockConnectivity], path: str | Path, title: str = "") -> Path:
    """One column per dense block: LGC reads (top) and SFR rewrites (bottom)."""
    plt = _pyplot()
    has_sfr = any(b.sfr is not None for b in blocks)
    nrows = 2 if has_sfr else 1
    fig, axes = plt.subplots(
        nrows, len(blocks), figsize=(3.2 * len(blocks) + 1.2, 3.2 * nrows + 0.6), squeeze=False
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # NaN (s >= t): blank
    vmin, vmax = color_range(blocks)
    image = None
    for col, b in enumerate(blocks):
        for row, (kind, m) in enumerate((("LGC reads", b.lgc), ("SFR rewrites", b.sfr))[:nrows]):
            ax = axes[row][col]
            if m is None:
                ax.axis("off")
                continue
            n = m.shape[0]
            image = ax.imshow(m.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, origin="upper")
            ax.set_title(f"{b.name.split('.')[-1]}: {kind}", fontsize=9)
            ax.set_xlabel("source (0 = block input)", fontsize=8)
            ax.set_ylabel("target layer", fontsize=8)
            step = max(1, n // 8)
            ax.set_xticks(range(0, n, step))
            ax.set_yticks(range(0, n, step))
            ax.set_yticklabels([str(t + 1) for t in range(0, n, step)])
            ax.tick_params(labelsize=7)
            if n <= 10:
                for t in range(n):
                    for s in range(t + 1):
                        v = float(m[t, s])
                        if not math.isnan(v):
                            ax.text(s, t, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                    color="white" if v < (vmin + vmax) / 2 else "black")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="fraction of source channels")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_PANELS = (
    ("accuracy (%)", ("val/top1", "val/top5")),
    ("loss", ("train/loss", "val/loss")),
    ("learning rate", ("train/lr",)),
    ("density (kept connections)", ("condense/density_lgc", "condense/density_sfr")),
)


def plot_curves(series: dict[str, tuple[list[int], list[float]]], path: str | Path, title: str = "") -> Path:
    """Top-1/top-5, losses, learning rate and LGC/SFR density against the step."""
    plt = _pyplot()
    last_step = max((max(steps) for steps, _ in series.values() if steps), default=0)
    stages = condensation_steps(series)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (label, names) in zip(axes.ravel(), _PANELS):
        drawn = False
        for k, step in enumerate(stages):
            ax.axvline(step, color="gray", linestyle=":", linewidth=0.9,
                       label="condensation step" if k == 0 else None)
        for name in names:
            if name not in series:
                continue
            steps, values = series[name]
            if name.startswith("condense/density"):
                # Logged at each condensation step: every mask starts dense, the last
                # density holds to the end of the run.
                steps, values = [0, *steps, max(last_step, steps[-1])], [1.0, *values, values[-1]]
                ax.step(steps, values, where="post", marker="o", markersize=3, label=name)
            else:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
            drawn = True
        if label == "loss":
            _clip_outliers(ax, [v for n in names if n in series for v in series[n][1]])
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        if drawn:
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _clip_outliers(ax, values: list[float]) -> None:
    limits = robust_ylim(values)
    if limits is None:
        return
    ax.set_ylim(*limits)
    above = sum(v > limits[1] for v in values if math.isfinite(v))
    if above:
        ax.text(0.99, 0.98, f"{above} point(s) above, up to {max(values):.3g}", ha="right", va="top",
                transform=ax.transAxes, fontsize=7, color="gray")
