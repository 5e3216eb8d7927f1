"""torch.hub entry points: one per registered cdnv2 model (cdnv2_a, cdnv2_b, cdnv2_c, ...).

    import torch
    model = torch.hub.load("path/to/cdnv2", "cdnv2_b", source="local", weights="cdnv2_b.safetensors")

``weights``: a cdnv2 checkpoint or compact artifact (.pt / .safetensors) or an official
CondenseNetV2 release file; None builds the model with random weights. Other keyword
arguments are model options (``num_classes=...`` replaces the classifier of loaded
weights). Nothing is downloaded. Works from a clone whether or not cdnv2 is installed.
"""
import sys
from pathlib import Path

dependencies = ["torch", "torchvision"]

try:
    import cdnv2
except ImportError:  # a clone that is not installed: use its src/ folder
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
    import cdnv2


def _entry(name):
    def entry(weights=None, **kwargs):
        return cdnv2.create_model(name, pretrained=weights, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"{name}: weights=PATH (a cdnv2 checkpoint or .safetensors artifact, or an official release "
        "file) or None (random weights); other keyword arguments are model options."
    )
    return entry


for _name in cdnv2.list_models():
    globals()[_name] = _entry(_name)
