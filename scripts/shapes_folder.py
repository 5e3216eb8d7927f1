"""Write the generated `shapes` data as an ImageFolder of PNGs: a folder to try the
imagefolder path, cdnv2-predict and the per-class evaluation on without a download.

    python scripts/shapes_folder.py out=shapes_png train=100 val=30
    cdnv2-train data=imagefolder data.root=shapes_png data.image_size=32 data.eval_resize=null \
        data.random_resized_crop=false data.mean=[0.5,0.5,0.5] data.std=[0.3,0.3,0.3]

Writes out/train/<class>/NNNN.png and out/val/<class>/NNNN.png (train / val images per
class; the 10 shape classes; seed 0 for train, 1 for val) and prints a table of counts.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from cdnv2.data.shapes import SHAPES_CLASSES as CLASSES
from cdnv2.data.shapes import make_shapes
from cdnv2.tables import format_grid


def write_split(root: Path, count: int, seed: int) -> list[int]:
    images, labels = make_shapes(count * len(CLASSES) * 2, seed=seed)
    written = [0] * len(CLASSES)
    for image, label in zip(images, labels.tolist()):
        if written[label] < count:
            folder = root / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{written[label]:04d}.png")
            written[label] += 1
    return written


def main(argv: list[str]) -> None:
    opts = {"out": "shapes_png", "train": "100", "val": "30"}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key not in opts or not value:
            sys.exit(f"usage: python scripts/shapes_folder.py [out=DIR] [train=N] [val=N] (got {arg!r})")
        opts[key] = value
    out = Path(opts["out"])
    counts = {split: write_split(out / split, int(opts[split]), seed) for seed, split in enumerate(("train", "val"))}
    rows = [[c, str(counts["train"][i]), str(counts["val"][i])] for i, c in enumerate(CLASSES)]
    print(format_grid(["class", "train", "val"], rows, "PNG images"))
    print(f"written to {out}/train and {out}/val")


if __name__ == "__main__":
    main(sys.argv[1:])
