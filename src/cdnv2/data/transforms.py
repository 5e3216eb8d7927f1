"""Train and eval transforms, and RandAugment with magnitude noise.

Transforms accept a PIL image (folders, CIFAR) or a uint8 CHW tensor (shapes) and
return a normalised float CHW tensor. Their randomness comes from the global torch RNG,
which :mod:`cdnv2.data.loaders` seeds per sample, so augmentation does not depend on
the number of loader workers.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.autoaugment import _apply_op  # the op table RandAugment uses

from .config import AUTO_AUGMENTS, INTERPOLATIONS, MAX_IMAGE_SIZE, DataConfig, DataError

_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


def interpolation_mode(name: str) -> InterpolationMode:
    if name not in _INTERPOLATION:
        raise DataError(f"data.interpolation={name!r} is not one of {', '.join(INTERPOLATIONS)}.")
    return _INTERPOLATION[name]


class RandAugmentNoise(T.RandAugment):
    """RandAugment whose magnitude is drawn per op from N(magnitude, magnitude_std),
    clipped to [0, num_magnitude_bins - 1] (timm's "rand-m9-mstd0.5").

    torchvision's RandAugment indexes a table of ``num_magnitude_bins`` strengths with an
    integer magnitude; a noisy magnitude falls between two entries, so the strength is
    interpolated linearly (Posterize bits are rounded). With 11 bins the scale is
    timm's 0-10: magnitude 9 is 90% of each op's maximum. The op set is torchvision's.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        num_magnitude_bins: int = 11,
        interpolation: InterpolationMode = InterpolationMode.BILINEAR,
        fill: list[float] | None = None,
    ):
        if not 0 <= magnitude <= num_magnitude_bins - 1:
            raise DataError(
                f"data.randaugment_magnitude={magnitude} is outside the scale "
                f"0..{num_magnitude_bins - 1} set by data.randaugment_num_bins={num_magnitude_bins}."
            )
        super().__init__(num_ops, 0, num_magnitude_bins, interpolation, fill)
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)

    def sample_magnitude(self) -> float:
        m = self.magnitude
        if self.magnitude_std > 0:
            m += self.magnitude_std * float(torch.randn(()))
        return min(max(m, 0.0), self.num_magnitude_bins - 1.0)

    def forward(self, img):
        fill = self.fill
        channels, height, width = F.get_dimensions(img)
        if isinstance(img, torch.Tensor) and fill is not None:
            fill = [float(f) for f in fill]
        op_meta = self._augmentation_space(self.num_magnitude_bins, (height, width))
        names = list(op_meta)
        for _ in range(self.num_ops):
            name = names[int(torch.randint(len(names), ()))]
            table, signed = op_meta[name]
            magnitude = 0.0
            if table.ndim > 0:
                magnitude = _lerp(table, self.sample_magnitude())
                if name == "Posterize":
                    magnitude = float(round(magnitude))
            if signed and int(torch.randint(2, ())):
                magnitude = -magnitude
            img = _apply_op(img, name, magnitude, interpolation=self.interpolation, fill=fill)
        return img

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"magnitude_std={self.magnitude_std}, num_magnitude_bins={self.num_magnitude_bins})"
        )


def _lerp(table: torch.Tensor, position: float) -> float:
    lo = int(position)
    hi = min(lo + 1, len(table) - 1)
    frac = position - lo
    return float(table[lo]) * (1 - frac) + float(table[hi]) * frac


class ToFloatTensor:
    """PIL image or uint8 tensor -> float CHW tensor in [0, 1]."""

    def __call__(self, img) -> torch.Tensor:
        if isinstance(img, Image.Image):
            img = F.pil_to_tensor(img)
        if img.dtype == torch.uint8:
            return img.float().div_(255)
        return img.float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def auto_augment(cfg: DataConfig, mean: Sequence[float], interp: InterpolationMode):
    """The policy ``data.auto_augment`` names (torchvision's implementations), or None.

    ``randaugment`` is :class:`RandAugmentNoise` and is on only when
    ``data.randaugment_magnitude`` is set (the recipes' semantics). Geometric ops fill with
    the mean colour, as timm does, instead of black. AutoAugment uses the CIFAR-10 policy
    on CIFAR and the ImageNet policy elsewhere.
    """
    fill = [round(255 * m) for m in mean]
    name = cfg.auto_augment
    if name == "randaugment":
        if cfg.randaugment_magnitude is None:
            return None
        return RandAugmentNoise(
            cfg.randaugment_num_ops, cfg.randaugment_magnitude, cfg.randaugment_mstd,
            cfg.randaugment_num_bins, fill=fill,
        )
    if name == "trivialaugment":
        return T.TrivialAugmentWide(interpolation=interp, fill=fill)
    if name == "autoaugment":
        policy = T.AutoAugmentPolicy.CIFAR10 if cfg.name.startswith("cifar") else T.AutoAugmentPolicy.IMAGENET
        return T.AutoAugment(policy, interpolation=interp, fill=fill)
    if name == "augmix":
        return T.AugMix(interpolation=interp, fill=fill)
    if name == "none":
        return None
    raise DataError(f"data.auto_augment={name!r} is not one of {', '.join(AUTO_AUGMENTS)}.")


def build_train_transform(cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """The train augmentation of ``cfg``: crop, flip, auto-augment policy, normalise, erase."""
    interp = interpolation_mode(cfg.interpolation)
    if cfg.random_resized_crop:
        ops: list[Any] = [
            T.RandomResizedCrop(cfg.image_size, scale=(cfg.rrc_scale_min, 1.0), interpolation=interp, antialias=True)
        ]
    else:
        # A no-op on images that already have the size (CIFAR, shapes).
        ops = [
            T.Resize(cfg.image_size, interpolation=interp, antialias=True),
            T.RandomCrop(cfg.image_size, padding=cfg.crop_padding or None),
        ]
    if cfg.hflip:
        ops.append(T.RandomHorizontalFlip())
    policy = auto_augment(cfg, mean, interp)
    if policy is not None:
        ops.append(policy)
    ops += [ToFloatTensor(), T.Normalize(mean, std)]
    if cfg.random_erasing > 0:
        # After Normalize: value="random" draws N(0, 1) per pixel, i.e. timm's "pixel" mode.
        ops.append(T.RandomErasing(p=cfg.random_erasing, value="random"))
    return T.Compose(ops)


def eval_preprocess(cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> dict:
    """The eval transform as plain primitives, to store in a checkpoint."""
    interpolation_mode(cfg.interpolation)
    return {
        "resize": int(cfg.eval_resize or cfg.image_size),  # short side, before the crop
        "crop": int(cfg.image_size),
        "interpolation": cfg.interpolation,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
    }


PREPROCESS_KEYS = ("resize", "crop", "interpolation", "mean", "std")


def check_eval_preprocess(p: Any, where: str = "eval_preprocess", complete: bool = True) -> None:
    """Raise :class:`DataError` unless ``p`` is an eval preprocessing dict that
    :func:`build_eval_transform` can use (a file's recorded values are not trusted).
    ``complete=False``: check only the keys present (a file may record a partial dict)."""

    def bad(what: str) -> DataError:
        return DataError(
            f"{where}: {what}; the eval preprocessing needs resize and crop (whole numbers of pixels, "
            f"1 to {MAX_IMAGE_SIZE}), interpolation ({', '.join(INTERPOLATIONS)}), mean and std (equally long "
            "lists of numbers, std not 0). The file is inconsistent (or edited)."
        )

    if not isinstance(p, dict):
        raise bad(f"the recorded preprocessing is a {type(p).__name__}, not a dict")
    missing = [k for k in PREPROCESS_KEYS if k not in p]
    if missing and complete:
        raise bad(f"it lacks the key(s) {', '.join(missing)}")
    for key in ("resize", "crop"):
        if key not in p:
            continue
        v = p[key]
        if key == "resize" and v in (None, 0):  # no resize before the crop
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_IMAGE_SIZE:
            raise bad(f"{key}={v!r}")
    if "interpolation" in p and p["interpolation"] not in INTERPOLATIONS:
        raise bad(f"interpolation={p['interpolation']!r}")
    for key in ("mean", "std"):
        if key not in p:
            continue
        v = p[key]
        ok = isinstance(v, (list, tuple)) and 1 <= len(v) <= 64 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and abs(x) < float("inf") for x in v)
        if not ok or (key == "std" and any(x == 0 for x in v)) or len(v) != len(p.get("mean", v)):
            raise bad(f"{key}={v!r}")


def build_eval_transform(eval_preprocess: dict) -> Callable:
    """Rebuild the eval transform (resize, center crop, normalise) from its dict."""
    check_eval_preprocess(eval_preprocess)
    resize, crop = eval_preprocess["resize"], eval_preprocess["crop"]
    interp = interpolation_mode(eval_preprocess["interpolation"])
    mean, std = eval_preprocess["mean"], eval_preprocess["std"]
    ops: list[Any] = []
    if resize:
        ops.append(T.Resize(int(resize), interpolation=interp, antialias=True))
    ops += [T.CenterCrop(int(crop)), ToFloatTensor(), T.Normalize(list(mean), list(std))]
    return T.Compose(ops)
