"""Per-class accuracy and the confusion matrix of an evaluation (``cdnv2-eval``).

The matrix counts top-1 predictions: row = true class, column = predicted class
(:func:`cdnv2.evaluate.evaluate` with ``confusion=True``). From it: each class's
accuracy (its diagonal over its row), the class it is most often mistaken for, the
worst classes and the largest off-diagonal cells. Written as ``per_class.csv``,
``confusion.csv`` and, with matplotlib installed, ``confusion.png`` (labelled up to
:data:`MAX_PLOT_CLASSES` classes; with more, the largest confusions are a table).
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

MAX_PLOT_CLASSES = 100  # more classes: no PNG, the top confusions as a table instead


@dataclass
class ClassScore:
    index: int
    name: str
    samples: int  # images of this class
    correct: int  # of them predicted as this class
    accuracy: Optional[float]  # percent; None without samples
    confused_with: Optional[str]  # the wrong class predicted most often
    confused_count: int  # how often

    def as_dict(self) -> dict:
        return asdict(self)


def class_names_for(confusion: torch.Tensor, names: Optional[Sequence[str]]) -> list[str]:
    n = confusion.shape[0]
    return list(names) if names is not None and len(names) == n else [str(i) for i in range(n)]


def per_class(confusion: torch.Tensor, names: Optional[Sequence[str]] = None) -> list[ClassScore]:
    """One :class:`ClassScore` per row of ``confusion``."""
    names = class_names_for(confusion, names)
    off = confusion.clone()
    off.fill_diagonal_(0)
    scores = []
    for i, row in enumerate(confusion.tolist()):
        samples, correct = sum(row), row[i]
        j = int(off[i].argmax())
        wrong = int(off[i, j])
        scores.append(ClassScore(
            index=i, name=names[i], samples=samples, correct=correct,
            accuracy=100.0 * correct / samples if samples else None,
            confused_with=names[j] if wrong else None, confused_count=wrong,
        ))
    return scores


def worst_classes(scores: list[ClassScore], n: int) -> list[ClassScore]:
    """The ``n`` classes with the lowest accuracy (more samples first among equals)."""
    seen = [s for s in scores if s.samples]
    return sorted(seen, key=lambda s: (s.accuracy, -s.samples, s.index))[:n]


def top_confusions(confusion: torch.Tensor, names: Optional[Sequence[str]] = None, n: int = 20) -> list[dict]:
    """The ``n`` largest off-diagonal cells: {true, predicted, count, percent of the true class}."""
    names = class_names_for(confusion, names)
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(n, off.numel()))
    c = confusion.shape[0]
    out = []
    for count, k in zip(counts.tolist(), flat.tolist()):
        if count == 0:
            break
        t, p = divmod(k, c)
        total = int(confusion[t].sum())
        out.append({"true": names[t], "predicted": names[p], "count": count, "percent": 100.0 * count / total})
    return out


def summary(confusion: torch.Tensor, names: Optional[Sequence[str]] = None, top: int = 20) -> dict:
    """For eval.json: per-class scores, the ``top`` largest confusions and (up to
    :data:`MAX_PLOT_CLASSES` classes) the matrix itself; with more, it is in confusion.csv only."""
    names = class_names_for(confusion, names)
    small = confusion.shape[0] <= MAX_PLOT_CLASSES
    return {
        "per_class": [s.as_dict() for s in per_class(confusion, names)],
        "top_confusions": top_confusions(confusion, names, top),
        "confusion_matrix": {"rows": "true class", "columns": "predicted class", "classes": names,
                             "counts": confusion.tolist()} if small else None,
    }


def companion(eval_json: str | Path, name: str) -> Path:
    """``confusion.csv`` beside ``eval.json``; ``<stem>_confusion.csv`` beside another name."""
    eval_json = Path(eval_json)
    return eval_json.with_name(name if eval_json.name == "eval.json" else f"{eval_json.stem}_{name}")


def write_files(eval_json: str | Path, confusion: torch.Tensor, names: Optional[Sequence[str]] = None,
                title: str = "") -> tuple[dict[str, Optional[str]], Optional[str]]:
    """per_class.csv, confusion.csv and confusion.png beside ``eval_json``: ({kind: path or None}, note)."""
    names = class_names_for(confusion, names)
    files: dict[str, Optional[str]] = {
        "per_class_csv": str(write_per_class_csv(companion(eval_json, "per_class.csv"), per_class(confusion, names))),
        "confusion_csv": str(write_confusion_csv(companion(eval_json, "confusion.csv"), confusion, names)),
    }
    png = companion(eval_json, "confusion.png")
    note = plot_confusion(png, confusion, names, title)
    files["confusion_png"] = None if note else str(png)
    return files, note


# ----------------------------------------------------------------------------- files
def write_per_class_csv(path: str | Path, scores: list[ClassScore]) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "class", "samples", "correct", "accuracy", "confused_with", "confused_count"])
        for s in scores:
            w.writerow([s.index, s.name, s.samples, s.correct, "" if s.accuracy is None else f"{s.accuracy:.4f}",
                        s.confused_with or "", s.confused_count])
    return path


def write_confusion_csv(path: str | Path, confusion: torch.Tensor, names: Optional[Sequence[str]] = None) -> Path:
    """The full matrix: a header row of predicted classes, then one row per true class."""
    names = class_names_for(confusion, names)
    path = Path(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *names])
        for name, row in zip(names, confusion.tolist()):
            w.writerow([name, *row])
    return path


def plot_confusion(path: str | Path, confusion: torch.Tensor, names: Optional[Sequence[str]] = None,
                   title: str = "") -> Optional[str]:
    """Draw the row-normalised matrix to ``path``; return why not (None when drawn).

    Uses matplotlib's object API (no global backend change). Not drawn without
    matplotlib or above :data:`MAX_PLOT_CLASSES` classes.
    """
    c = confusion.shape[0]
    if c > MAX_PLOT_CLASSES:
        return f"no confusion.png: {c} classes are too many to label (limit {MAX_PLOT_CLASSES}); see the top confusions"
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return "no confusion.png: matplotlib is not installed (pip install 'cdnv2[viz]')"
    names = class_names_for(confusion, names)
    share = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = min(24.0, 3.0 + 0.22 * c)
    cell_points = 0.75 * size * 72 / max(c, 1)  # the axes take about 3/4 of the figure
    font = max(5.0, min(9.0, 0.5 * cell_points))
    fig = Figure(figsize=(size + 1.5, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(c), names, rotation=90, fontsize=font)
    ax.set_yticks(range(c), names, fontsize=font)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if c <= 20:  # counts fit in the cells
        for t in range(c):
            for p in range(c):
                if confusion[t, p]:
                    ax.text(p, t, str(int(confusion[t, p])), ha="center", va="center", fontsize=font,
                            color="white" if share[t, p] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title or "confusion matrix (rows: true class)")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    return None
