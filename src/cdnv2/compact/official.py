"""Official CondenseNetV2 release files (SPEC 7): recognise them, map them onto our models.

:func:`official_state_dict` / :func:`guess_official_variant` recognise a file's dict and
its variant; :func:`build_official_model` turns its state dict into our model. Files are
read by :func:`cdnv2.checkpoint.load_official_checkpoint` / ``open_checkpoint``.

The official model names its modules like ours (``features.denseblock_{b}.denselayer_{l}``
with ``conv_1`` / ``conv_2`` / ``se`` / ``sfr``), so most keys map one to one. The
differences, all handled by :func:`official_to_ours`:

- a ``module.`` prefix (DataParallel / DDP);
- unconverted LGC/SFR buffers ``_mask`` / ``_count`` / ``_stage`` (float) -> our ``mask``
  and ``stage`` (a long scalar; ``_count`` is implied by it). The number of steps done
  is read from the mask itself: the official float progress window can leave
  ``_stage`` behind the mask, and the mask is what the weights were trained with;
- the head SE: official ``features.se_last.*``, ours ``se_last.*``;
- converted SFR: official ``sfr.index`` is a float c' x c 0/1 matrix (row r has a 1 at
  the target channel of produced channel r); ours is the vector of those targets.
  Converted LGC keys (``conv_1.index``, BN on the selected channels, grouped weight)
  and the converted SFR's grouped weight are laid out exactly as in our compact layers.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..data.loaders import IMAGENET_MEAN, IMAGENET_STD
from ..errors import CheckpointError
from ..layers import CondensingConv1x1, SparseFeatureReactivation
from ..models import create_model
from .convert import restructure_for_state_dict

__all__ = [
    "OFFICIAL_VARIANTS",
    "build_official_model",
    "guess_official_variant",
    "official_preprocess",
    "official_state_dict",
    "official_to_ours",
    "pick_state_dict",
]

OFFICIAL_VARIANTS = ("cdnv2_a", "cdnv2_b", "cdnv2_c")


def pick_state_dict(obj: Any, where: str, use_ema: bool) -> dict[str, torch.Tensor]:
    """The raw or EMA state dict of an official file's dict (or the bare state dict it is)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: expected a dict, found a {type(obj).__name__}")
    if "state_dict" in obj or "state_dict_ema" in obj:
        key = "state_dict_ema" if use_ema else "state_dict"
        sd = obj.get(key)
        if not isinstance(sd, dict):
            have = [k for k in ("state_dict", "state_dict_ema") if isinstance(obj.get(k), dict)]
            raise CheckpointError(
                f"{where}: has no {key!r} (it has {', '.join(have) or 'neither'}); "
                f"call with use_ema={not use_ema}"
            )
        return sd
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj  # a bare state dict
    raise CheckpointError(
        f"{where}: not an official CondenseNetV2 checkpoint (keys: {', '.join(sorted(map(str, obj))[:8])})"
    )


def _steps_from_mask(mask: torch.Tensor, layer: CondensingConv1x1, key: str) -> int:
    """Condensation steps done, read from a mask: every group drops 1/C per step."""
    m = mask.reshape(layer.out_channels, layer.in_channels) != 0
    g, c = layer.groups, layer.condense_factor
    if isinstance(layer, SparseFeatureReactivation):  # groups over inputs, prune outputs
        kept = m[:, :g].sum(0)
        total = layer.out_channels
    else:  # groups over outputs, prune inputs
        kept = m[:g].sum(1)
        total = layer.in_channels
    step = total // c
    dropped = total - kept
    if not bool((dropped == dropped[0]).all()) or int(dropped[0]) % step:
        raise CheckpointError(f"{key}: mask does not follow the LGC/SFR pattern (kept per group {kept.tolist()})")
    return int(dropped[0]) // step


def official_to_ours(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename and convert official keys for ``model`` (a freshly built masked model).

    Mask-derived stages win over inconsistent ``_stage`` values (with a warning).
    """
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if key.startswith("features.se_last."):
            key = key[len("features."):]
        prefix, _, leaf = key.rpartition(".")
        if leaf == "_count":
            continue
        if leaf == "_mask":
            out[f"{prefix}.mask"] = value.float()
            continue
        if leaf == "_stage":
            out[f"{prefix}.stage"] = value  # resolved below, once the mask is known
            continue
        if leaf == "index" and prefix.endswith("sfr") and value.dim() == 2:
            value = _routing_to_index(value, key)
        out[key] = value
    for key in [k for k in out if k.endswith(".stage")]:
        prefix = key[: -len(".stage")]
        layer = modules.get(prefix)
        mask = out.get(f"{prefix}.mask")
        official = int(out[key].reshape(-1)[0]) if out[key].numel() else -1
        if isinstance(layer, CondensingConv1x1) and mask is not None and mask.numel() == layer.mask.numel():
            steps = _steps_from_mask(mask, layer, prefix)
            if steps != official:
                warnings.warn(
                    f"{prefix}: _stage={official} but its mask shows {steps} condensation steps; "
                    "using the mask", stacklevel=3,
                )
        else:
            steps = official
        out[key] = torch.tensor(steps, dtype=torch.long)
    return out


def _routing_to_index(matrix: torch.Tensor, key: str) -> torch.Tensor:
    """Official float routing matrix (produced x targets, one 1 per row) -> target vector."""
    ones = (matrix != 0).sum(1)
    if not bool((ones == 1).all()) or not bool(((matrix == 0) | (matrix == 1)).all()):
        raise CheckpointError(f"{key}: expected one 1 per row of the SFR routing matrix")
    return matrix.argmax(1)


def _official_name(key: str) -> str:
    """Our key as the official release would spell it (for error messages)."""
    if key.startswith("se_last."):
        key = "features." + key
    if key.endswith(".mask"):
        key = key[: -len("mask")] + "_mask"
    elif key.endswith(".stage"):
        key = key[: -len("stage")] + "_stage"
    return key


def build_official_model(raw: dict[str, torch.Tensor], model_name: str, where: str) -> nn.Module:
    """Our ``model_name`` (eval mode) holding an official state dict ``raw``.

    Unconverted files give our masked model, converted files our compact model; either
    computes what the official model computes. ``where`` names the source in errors.
    """
    model = create_model(model_name)
    sd = official_to_ours(raw, model)
    restructure_for_state_dict(model, sd)
    ours = model.state_dict()
    for key in ours:  # very old files have no BN batch counters
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros((), dtype=torch.long)
    missing = [k for k in ours if k not in sd]
    unexpected = [k for k in sd if k not in ours]
    shapes = [f"{_official_name(k)} {tuple(sd[k].shape)} vs {tuple(v.shape)}"
              for k, v in ours.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(_official_name(k) for k in missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(_official_name(k) for k in unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:3])})")
        raise CheckpointError(
            f"{where}: the weights do not fit {model_name}: " + "; ".join(parts)
            + ". Is it another variant?"
        )
    model.load_state_dict(sd, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- detection
def official_state_dict(obj: Any) -> Optional[dict]:
    """The state dict of an official release file, or None if ``obj`` does not look like one."""
    if not isinstance(obj, dict) or obj.get("format") == "cdnv2":
        return None
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) for k in sd):
        return None
    if not all(torch.is_tensor(v) for v in sd.values()):
        return None
    keys = [k[len("module."):] if k.startswith("module.") else k for k in sd]
    markers = ("features.init_conv.", "features.denseblock_", "._mask", "conv_1.index", "sfr.index")
    if any(any(m in k for m in markers) for k in keys):
        return sd
    return None


def guess_official_variant(state_dict: dict) -> Optional[str]:
    """cdnv2_a / _b / _c from the number of dense layers per block in the keys."""
    layers: dict[int, set[int]] = {}
    for key in state_dict:
        m = re.search(r"features\.denseblock_(\d+)\.denselayer_(\d+)\.", key)
        if m:
            layers.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not layers:
        return None
    stages = tuple(len(layers[b]) for b in sorted(layers))
    for name in OFFICIAL_VARIANTS:
        with torch.device("meta"):  # the architecture only: no memory, no init cost
            variant = create_model(name)
        if tuple(variant.cfg.stages) == stages:
            return name
    return None


def official_preprocess(model_name: str) -> dict:
    """The official test script's eval transform (SPEC 8)."""
    return {
        "resize": 256,
        "crop": 224,
        "interpolation": "bilinear" if model_name == "cdnv2_c" else "bicubic",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
