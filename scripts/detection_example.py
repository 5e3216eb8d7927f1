"""Object detection with a compact CondenseNetV2 backbone (torchvision Faster R-CNN + FPN).

    python scripts/detection_example.py                      # a few CPU minutes
    python scripts/detection_example.py --init runs/cdnv2_tiny-shapes/model_compact.pt

The backbone is ``cdnv2.create_model(..., features_only=True)`` on a compact model: the
map after each dense block feeds a feature pyramid (torchvision's FPN), and Faster
R-CNN's RPN and box head run on the pyramid. Without ``--init`` the backbone is a
freshly built network condensed at initialisation (the masks keep the largest random
weights) and converted, so the compact structure trains end to end; with ``--init`` it
is any cdnv2 checkpoint (``cdnv2.load_model(path, features_only=True)``).

Data: generated in memory, like the quickstart's shapes. Each image holds one to three
objects of the six shape classes (circle, square, triangle, ring, plus, cross) at random
sizes and places on a random background; their boxes are the masks' extents. Prints a
table per epoch: training loss, validation mAP (COCO-style, torchmetrics) and mAP@0.5,
next to the mAP of random boxes (chance).
"""
from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

import cdnv2
from cdnv2.data.shapes import SHAPES_CLASSES, shape_masks
from cdnv2.layers import CondensingConv1x1

OBJECTS = SHAPES_CLASSES[:6]  # the textures (6-9) fill whole images: not objects


# ----------------------------------------------------------------------------- data
def make_detection_set(num: int, seed: int, size: int = 96, max_objects: int = 3) -> list:
    """``num`` (image float (3, size, size) in [0, 1], {"boxes", "labels"}) pairs.

    Labels count from 1 (0 is Faster R-CNN's background). Objects do not overlap.
    """
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num):
        bg = torch.rand(3, 1, 1, generator=g)
        image = bg.expand(3, size, size).clone()
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=g))):
            label = int(torch.randint(len(OBJECTS), (1,), generator=g))
            p = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=g))
            mask = shape_masks(label, 1, p, g)[0]
            for _attempt in range(20):
                x0, y0 = (int(v) for v in torch.randint(0, size - p + 1, (2,), generator=g))
                ys, xs = mask.nonzero(as_tuple=True)
                box = [x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1]
                if all(_disjoint(box, b) for b in boxes):
                    fg = (bg + 0.3 + 0.4 * torch.rand(3, 1, 1, generator=g)) % 1.0
                    patch = image[:, y0:y0 + p, x0:x0 + p]
                    image[:, y0:y0 + p, x0:x0 + p] = torch.where(mask, fg, patch)
                    boxes.append(box)
                    labels.append(label + 1)
                    break
        image = (image + 0.05 * torch.randn(image.shape, generator=g)).clamp_(0, 1)
        target = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                  "labels": torch.tensor(labels, dtype=torch.int64)}
        samples.append((image, target))
    return samples


def _disjoint(a: list[int], b: list[int], gap: int = 2) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# ----------------------------------------------------------------------------- model
class BlockFPN(nn.Module):
    """Dense-block maps of a features_only CondenseNetV2 -> FPN levels "0", "1", ..., "pool"."""

    def __init__(self, body: nn.Module, out_channels: int = 64):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels  # what torchvision's detectors read

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))


def compact_backbone(model: str = "cdnv2_tiny", init: str | None = None, out_indices=None, **overrides) -> nn.Module:
    """A features_only compact CondenseNetV2: loaded from ``init``, or built and condensed now."""
    if init:
        return cdnv2.load_model(init, features_only=True, out_indices=out_indices).train()
    masked = cdnv2.create_model(model, **overrides)
    with torch.no_grad():
        for m in masked.modules():  # masks from the initial weights' magnitudes
            if isinstance(m, CondensingConv1x1):
                while not m.fully_condensed:
                    m.condense_step()
    compact = cdnv2.convert_model(masked.eval())
    return cdnv2.models.features_only(compact, out_indices).train()


def build_detector(backbone: nn.Module, num_classes: int = len(OBJECTS) + 1, size: int = 96,
                   fpn_channels: int = 64) -> FasterRCNN:
    """Faster R-CNN sized for small images: one anchor size per pyramid level."""
    fpn = BlockFPN(backbone, fpn_channels)
    strides = backbone.feature_info.reduction() + [2 * backbone.feature_info.reduction()[-1]]  # + pool level
    anchors = AnchorGenerator(tuple((4 * s,) for s in strides), ((0.5, 1.0, 2.0),) * len(strides))
    names = [str(i) for i in range(len(backbone.feature_info))]
    return FasterRCNN(
        fpn, num_classes=None, min_size=size, max_size=size,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.3, 0.3, 0.3],
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        box_batch_size_per_image=128, box_detections_per_img=20,
    )


# ----------------------------------------------------------------------------- train / eval
def train_step(detector: FasterRCNN, batch: list, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    detector.train()
    images = [img for img, _ in batch]
    targets = [t for _, t in batch]
    losses = detector(images, targets)
    total = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


@torch.no_grad()
def evaluate(detector: FasterRCNN, samples: list, batch_size: int = 16) -> dict[str, float]:
    detector.eval()
    metric = MeanAveragePrecision(box_format="xyxy")
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        preds = detector([img for img, _ in chunk])
        metric.update(preds, [t for _, t in chunk])
    out = metric.compute()
    return {"map": float(out["map"]), "map_50": float(out["map_50"])}


def chance_map(samples: list, seed: int = 0, per_image: int = 20) -> dict[str, float]:
    """mAP of random boxes with random classes and scores: what "above chance" means."""
    g = torch.Generator().manual_seed(seed)
    metric = MeanAveragePrecision(box_format="xyxy")
    for img, target in samples:
        size = img.shape[-1]
        xy = torch.rand(per_image, 2, generator=g) * size * 0.75
        wh = (0.1 + 0.4 * torch.rand(per_image, 2, generator=g)) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], 1)
        metric.update([{"boxes": boxes, "scores": torch.rand(per_image, generator=g),
                        "labels": torch.randint(1, len(OBJECTS) + 1, (per_image,), generator=g)}], [target])
    out = metric.compute()
    return {"map": float(out["map"]), "map_50": float(out["map_50"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="cdnv2_tiny", help="registered model (built, condensed, converted)")
    ap.add_argument("--init", default=None, help="a cdnv2 checkpoint to take the backbone from")
    ap.add_argument("--stem-stride", type=int, default=2, help="without --init: stem stride (2: maps at 1/2..1/8)")
    ap.add_argument("--out-indices", type=int, nargs="*", default=None, help="dense blocks to use (default all)")
    ap.add_argument("--size", type=int, default=96, help="image size")
    ap.add_argument("--train", type=int, default=480, help="training images")
    ap.add_argument("--val", type=int, default=120, help="validation images")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    train_set = make_detection_set(args.train, seed=args.seed, size=args.size)
    val_set = make_detection_set(args.val, seed=args.seed + 1, size=args.size)
    overrides = {} if args.init else {"stem_stride": args.stem_stride}
    backbone = compact_backbone(args.model, args.init, args.out_indices, **overrides)
    detector = build_detector(backbone, size=args.size)
    params = [p for p in detector.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    steps_per_epoch = len(train_set) // args.batch
    total = args.epochs * steps_per_epoch
    warmup = min(50, total // 4)
    print(f"backbone {args.init or args.model}: compact, feature maps {backbone.feature_info.channels()} "
          f"channels at strides {backbone.feature_info.reduction()}; detector "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M params; {len(train_set)} train / {len(val_set)} val images")

    chance = chance_map(val_set)
    rows = [("chance (random boxes)", "-", f"{chance['map'] * 100:.1f}", f"{chance['map_50'] * 100:.1f}", "-")]
    before = evaluate(detector, val_set)
    rows.append(("0 (untrained)", "-", f"{before['map'] * 100:.1f}", f"{before['map_50'] * 100:.1f}", "-"))
    step, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        losses = []
        for b in range(steps_per_epoch):
            # linear warmup, then cosine to zero
            lr = args.lr * (step + 1) / warmup if step < warmup else (
                0.5 * args.lr * (1 + torch.cos(torch.tensor((step - warmup) / max(1, total - warmup) * torch.pi)).item()))
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = [train_set[i] for i in order[b * args.batch:(b + 1) * args.batch].tolist()]
            losses.append(train_step(detector, batch, optimizer)["loss"])
            step += 1
        result = evaluate(detector, val_set)
        rows.append((str(epoch + 1), f"{sum(losses) / len(losses):.3f}", f"{result['map'] * 100:.1f}",
                     f"{result['map_50'] * 100:.1f}", f"{time.perf_counter() - start:.0f}"))
        print(f"epoch {epoch + 1}: loss {rows[-1][1]}, val mAP {rows[-1][2]}, mAP@50 {rows[-1][3]}", flush=True)
    header = ("epoch", "train loss", "val mAP (%)", "val mAP@0.5 (%)", "elapsed (s)")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    print(line)
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print(line)
    for r in rows:
        print("| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths)) + " |")
    print(line)


if __name__ == "__main__":
    main()
