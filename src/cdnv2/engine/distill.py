"""Knowledge distillation from a fixed teacher (Hinton et al., 2015).

``distill.teacher`` names the teacher: a cdnv2 checkpoint or compact artifact, an official
CondenseNetV2 release file (anything ``cdnv2-eval checkpoint=`` opens), or a torchvision
model name (``resnet50``), built without pretrained weights (nothing is downloaded) and
loaded from ``distill.teacher_weights`` when given. The loss adds, on top of the label
loss, ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (the T^2 keeps
the soft-target gradients on the scale of the hard ones). The teacher runs in eval mode
without gradients, on the same (augmented, mixed) batch as the student, under the same
autocast; under torchrun every rank holds its own copy and sees its own share of the batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


@dataclass
class DistillConfig:
    """Knowledge distillation (the ``distill`` config group); off while ``teacher`` is null."""

    teacher: Optional[str] = None  # cdnv2 checkpoint | official file | torchvision model name; null: off
    teacher_weights: Optional[str] = None  # torchvision teacher: a state_dict file to load
    alpha: float = 1.0  # weight of the soft-target term, added to the label loss
    temperature: float = 4.0  # softmax temperature of both distributions


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` at temperature T, averaged over the batch."""
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * (t * t)


def _is_torchvision_name(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models(module=torchvision.models)


def check_teacher(cfg: DistillConfig) -> None:
    """ConfigError unless ``distill.teacher`` is a readable file or a torchvision model name."""
    if cfg.teacher is None:
        return
    if Path(cfg.teacher).expanduser().is_file():
        return
    if not _is_torchvision_name(cfg.teacher):
        raise ConfigError(
            f"distill.teacher={cfg.teacher!r} is neither a file nor a torchvision model name. Give a cdnv2 "
            "checkpoint, a compact artifact or an official CondenseNetV2 file, or a torchvision classifier "
            "such as resnet50 (with distill.teacher_weights=PATH for its weights)."
        )
    if cfg.teacher_weights is not None and not Path(cfg.teacher_weights).expanduser().is_file():
        raise ConfigError(f"distill.teacher_weights={cfg.teacher_weights!r} is not a file.")


def build_teacher(cfg: DistillConfig, num_classes: int) -> nn.Module:
    """The teacher on the CPU, eval mode, frozen; its classes must be the run's."""
    from ..checkpoint import open_checkpoint, read_file

    check_teacher(cfg)
    if Path(cfg.teacher).expanduser().is_file():
        model = open_checkpoint(cfg.teacher).model
    else:
        import torchvision

        model = torchvision.models.get_model(cfg.teacher, weights=None, num_classes=num_classes)
        if cfg.teacher_weights is not None:
            state = read_file(cfg.teacher_weights, label=f"distill.teacher_weights={cfg.teacher_weights}")
            try:
                model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
            except RuntimeError as e:
                raise ConfigError(f"distill.teacher_weights does not fit {cfg.teacher}: {str(e)[:300]}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@torch.no_grad()
def teacher_logits(teacher: nn.Module, images: torch.Tensor, num_classes: int) -> torch.Tensor:
    logits = teacher(images)
    if logits.shape[1] != num_classes:
        raise ConfigError(
            f"the distillation teacher predicts {logits.shape[1]} classes, the data has {num_classes}: "
            "the teacher must be trained on the same classes."
        )
    return logits


def load_teacher(cfg: DistillConfig, num_classes: int, example: torch.Tensor, device: torch.device) -> nn.Module:
    """:func:`build_teacher` on ``device``, its class count checked on ``example`` images
    (before any training: a teacher of other classes is a user error, exit 2)."""
    teacher = build_teacher(cfg, num_classes).to(device)
    teacher_logits(teacher, example.to(device), num_classes)
    return teacher
