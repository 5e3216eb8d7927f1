"""Read the official CondenseNetV2 release files (SPEC 7) into our models.

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

import argparse
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import CheckpointError, restructure_for_state_dict
from .layers import CondensingConv1x1, SparseFeatureReactivation

__all__ = ["load_official_checkpoint", "official_to_ours"]


def _read(path_or_state_dict: Any, *, trust_pickle: bool) -> tuple[Any, str]:
    if isinstance(path_or_state_dict, dict):
        return path_or_state_dict, "<official state dict>"
    path = Path(path_or_state_dict)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        if trust_pickle:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        else:
            # timm's checkpoint saver (used by the official trainer) stores its argparse args
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        hint = "" if trust_pickle else (
            " If the file is from a source you trust and holds other Python objects, pass "
            "trust_pickle=True."
        )
        raise CheckpointError(
            f"{path}: cannot be read as an official CondenseNetV2 checkpoint "
            f"({type(e).__name__}: {first}).{hint}"
        ) from None
    return obj, str(path)


def _pick_state_dict(obj: Any, where: str, use_ema: bool) -> dict[str, torch.Tensor]:
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


def load_official_checkpoint(path_or_state_dict: str | os.PathLike | dict, model_name: str, *,
                             use_ema: bool = False, trust_pickle: bool = False) -> nn.Module:
    """Build ``model_name`` (cdnv2_a / cdnv2_b / cdnv2_c ...) from an official release file.

    Unconverted files give our masked model, converted files our compact model; either
    is returned in eval mode and computes what the official model computes.
    ``path_or_state_dict``: a file, a dict with ``state_dict`` / ``state_dict_ema``, or
    a bare state dict; ``module.`` prefixes are fine. ``use_ema`` picks ``state_dict_ema``.
    """
    from .models import create_model

    obj, where = _read(path_or_state_dict, trust_pickle=trust_pickle)
    raw = _pick_state_dict(obj, where, use_ema)
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
