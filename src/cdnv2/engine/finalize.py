"""The end of a training run: compact conversion, parity, ``report.json`` and its table.

After the last epoch :meth:`Trainer.finalize <cdnv2.engine.trainer.Trainer.finalize>`
calls :func:`finish_run`: it evaluates the masked model, converts it to the compact form
(:func:`convert_and_eval`: parity on a validation batch, evaluation, ``model_compact.pt``)
and writes ``report.json`` last, atomically: its presence means the run finished, so a
re-run of the same command only prints :func:`summary_table` again (:func:`show_finished`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed
from torch import nn

from .. import checkpoint as ckpt
from ..atomic_files import TMP_MARK
from ..compact import ParityError, Structure, check_parity, convert_model
from ..condense import condensing_layers
from ..data import Data
from ..evaluate import EvalResult
from ..flops import CostReport, count_cost
from ..models import create_model
from ..tables import format_table
from .config import TrainConfig, config_to_dict
from .distributed import DistInfo
from .hparams import log_tensorboard_hparams
from .logger import log

if TYPE_CHECKING:
    from .trainer import Trainer


def finish_run(trainer: Trainer) -> dict:
    """Evaluate the run's model (the EMA's weights when there is one), convert it, check parity,
    evaluate the compact model; rank 0 writes report.json, prints the table and closes the
    trackers. Returns the report."""
    t = trainer
    if t.structure is Structure.MASKED:
        t.condenser.step(t.total_steps)  # no-op unless the schedule was cut short
    model = t.eval_model()
    masked = t.run_eval(model, "eval masked")
    arch = t.model.arch_kwargs()
    reference = create_model(t.cfg.model.name, **arch)
    report = masked_report(
        t.cfg, masked, count_cost(reference, tuple(t.data.input_size)), steps=t.step,
        train_seconds=t.state.train_seconds, weights="ema" if t.ema is not None else "raw",
        best_top1=t.state.best_top1, init=t.init_report.as_dict() if t.init_report else None,
        run_dir=t.run_dir,
    )
    if t.dist.enabled:
        report["masks_identical_across_ranks"] = masks_identical(t.model, t.dist, t.device)
    if condensing_layers(reference):
        report["compact"] = convert_and_eval(
            model, t.cfg, t.data, arch, t.device, t.run_eval, report,
            t.run_dir / "model_compact.pt", write=t.is_main,
        )
    if t.is_main:
        write_report(t.run_dir, report)
        print(summary_table(report), flush=True)
        if t.logger.enabled:  # recipes: hyper-parameters with the final numbers
            log_tensorboard_hparams(t.logger.tb, config_to_dict(t.cfg), report)
        if t.mlflow is not None:
            t.mlflow.finish(report, t.step)
    return report


def show_finished(run_dir: Path, step: int, total_steps: int, is_main: bool) -> dict:
    """A re-run of a finished run: say so, print its table again, return its report."""
    report = read_report(run_dir)
    if is_main:
        log.info(
            "%s already finished (step %d of %d): nothing to do, its outputs are untouched. To train "
            "it again add resume=never (moves it aside), or name=... for a new run directory",
            run_dir, step, total_steps,
        )
        print(summary_table(report), flush=True)
    return report


def masked_report(cfg: TrainConfig, masked: EvalResult, cost: CostReport, *, steps: int, train_seconds: float,
                  weights: str, best_top1: float, init: dict | None, run_dir: Path) -> dict:
    """report.json's keys, filled for the masked model (:func:`convert_and_eval` adds the compact ones)."""
    return {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "epochs": cfg.trainer.epochs,
        "steps": steps,
        "train_seconds": round(train_seconds, 2),
        "weights": weights,
        **masked.as_dict(),
        "best_top1": best_top1,
        "flops": {"paper": cost.paper_flops, "masked_exec": cost.exec_flops},
        "params": {"paper": cost.paper_params, "masked": cost.params},
        "compact": None,
        "init": init,
        "run_dir": str(run_dir),
    }


def masks_identical(model: nn.Module, dist: DistInfo, device: torch.device) -> bool:
    """Gather a checksum of every structural buffer (masks, stages, indices) from all ranks."""
    params = {n for n, _ in model.named_parameters()}
    stats = ("running_mean", "running_var", "num_batches_tracked")
    checksum = torch.zeros(1, dtype=torch.float64, device=device)
    for i, (name, b) in enumerate(sorted(model.state_dict().items())):
        if name not in params and not name.endswith(stats):
            v = b.double().flatten()
            weights = torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype)
            checksum += (v * weights).sum() * (i + 1)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def parity_batch(loader, samples: int, device: torch.device) -> torch.Tensor:
    """The first ``samples`` validation images: the masked and compact models must agree on them."""
    images = []
    for x, _ in loader:
        images.append(x)
        if sum(i.shape[0] for i in images) >= samples:
            break
    return torch.cat(images)[:samples].to(device)


def convert_and_eval(
    model: nn.Module, cfg: TrainConfig, data: Data, arch_kwargs: dict, device: torch.device,
    run_eval: Callable[[nn.Module, str], EvalResult], report: dict, path: Path, write: bool,
) -> dict:
    """Convert ``model`` to compact, check parity, evaluate; add its cost to ``report``.

    Returns the report's ``compact`` entry; ``write`` (rank 0) saves the model to ``path``.
    """
    x = parity_batch(data.val_loader, cfg.trainer.parity_samples, device)
    compact = convert_model(model, check=False)  # checked here, once, for the report's numbers
    parity = check_parity(model, compact, x)
    if not parity.ok:
        raise ParityError(f"compact model does not match the masked model: {parity}")
    result = run_eval(compact, "eval compact")
    cost = count_cost(compact, tuple(data.input_size))
    report["flops"]["compact_exec"] = cost.exec_flops
    report["flops"]["compact_paper"] = cost.paper_flops
    report["params"]["compact"] = cost.params
    if write:
        ckpt.save_compact(
            path, compact, model_name=cfg.model.name, model_kwargs=arch_kwargs,
            class_names=list(data.class_names), preprocess=data.eval_preprocess,
            metrics=result.as_dict(), data=dataclasses.asdict(cfg.data), seed=cfg.seed,
        )
    return {
        **result.as_dict(),
        "parity_max_abs_diff": parity.max_abs_diff,
        "parity_output_scale": parity.output_scale,
        "path": str(path),
    }


def write_report(run_dir: Path, report: dict) -> None:
    """report.json exists complete or not at all: its presence means "finished"."""
    path = run_dir / "report.json"
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


def has_report(run_dir: Path) -> bool:
    try:
        json.loads((run_dir / "report.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def read_report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def summary_table(report: dict) -> str:
    rows = [
        ("model / data", f"{report['model']} / {report['data']}"),
        ("epochs / steps", f"{report['epochs']} / {report['steps']}"),
        ("train time", f"{report['train_seconds']:.1f} s"),
        (f"top-1 / top-5 (masked, {report['weights']})", f"{report['top1']:.2f}% / {report['top5']:.2f}%"),
        ("paper-rule FLOPs / params", f"{report['flops']['paper'] / 1e6:.2f}M / {report['params']['paper'] / 1e6:.3f}M"),
        ("masked model executes", f"{report['flops']['masked_exec'] / 1e6:.2f}M FLOPs / {report['params']['masked'] / 1e6:.3f}M"),
    ]
    c = report.get("compact")
    if c:
        rows += [
            ("top-1 / top-5 (compact)", f"{c['top1']:.2f}% / {c['top5']:.2f}%"),
            ("compact executes", f"{report['flops']['compact_exec'] / 1e6:.2f}M FLOPs / {report['params']['compact'] / 1e6:.3f}M"),
            ("parity max |diff|", f"{c['parity_max_abs_diff']:.2e} (output scale {c['parity_output_scale']:.2f})"),
            ("compact model", c["path"]),
        ]
    rows.append(("run directory", report["run_dir"]))
    return format_table(rows, "cdnv2-train summary")
