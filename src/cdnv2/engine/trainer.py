"""The training loop: train, condense in stages, evaluate, convert, report.

``train(cfg, run_dir)`` is the whole product in one call: the CLI composes a
:class:`TrainConfig` with Hydra and calls it; tests call it in-process. The loop is
deterministic given the seed (data randomness is derived per sample from the seed,
epoch and index), so a run that is killed and re-run with the same command resumes
from its last checkpoint and ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import atomic_files
from .. import signals as stop_signals
from ..compact import Structure
from ..condense import Condenser, ModelEMA
from ..data import build_data, mixup_cutmix
from ..errors import ConfigError, LoaderWorkerDied, NonFiniteLossError, TrainingInterrupted
from ..evaluate import EvalResult, evaluate
from ..models import create_model
from . import run_dir as rundir
from .accumulate import accumulate_backward, check_accum
from .bn_recal import recalibrate_after_condense
from .callbacks import Callback
from .config import TrainConfig, config_to_dict
from .distill import distill_loss, load_teacher, teacher_logits
from .distributed import (
    all_reduce_sum, any_rank_each, barrier, cleanup, distributed_env, init_distributed, wrap_ddp,
)
from .epoch_log import EpochLog
from .finalize import finish_run, show_finished
from .health import HealthWindow, StepHealth, apply_nan_policy
from .init_from import init_model
from .logger import MetricLogger, Progress, log
from .mlflow_logger import MlflowLogger, WithMlflow
from .optim import build_optimizer, lr_at, prime_momentum, resolve_lr, set_lr, step_unless
from .resume import (
    check_compatible, check_identity, check_target_folder, checkpoint_state, checkpoint_to_resume, keep_fallback,
    restore, run_finished, run_identity, start_afresh,
)
from .runtime import AUTOCAST_DTYPES, resolve_compact_training, resolve_device
from .state import TrainState
from .train_log import log_run_start, progress_loss, train_metrics
from .validation import validate_config


class Trainer:
    """Owns the run's :class:`~cdnv2.engine.state.TrainState` (model, optimizer, EMA, counters:
    what a checkpoint holds), the condensation schedule, the data and the run directory.

    Process-wide settings (threads, seeds, deterministic kernels) are the caller's:
    the CLI sets them with :func:`cdnv2.engine.runtime.configure_runtime`.
    ``callbacks`` (:class:`cdnv2.engine.callbacks.Callback`) run at fixed points of the loop.
    """

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, callbacks: Iterable[Callback] = (),
                 run: rundir.RunDir | None = None):
        """Set the run up in the order it needs: config check, ranks and device, the folder's
        lock, data and step counts, the seeded model, condenser, teacher, the TrainState, then
        resume and logs. Over 60 lines because it is that sequence; each step is one helper
        or a few lines."""
        validate_config(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.callbacks = list(callbacks)
        probe = "cuda" if cfg.trainer.device.startswith("cuda") or (
            cfg.trainer.device == "auto" and torch.cuda.is_available()
        ) else "cpu"
        self.dist = init_distributed(probe)
        self.device = resolve_device(cfg.trainer.device, self.dist.local_rank, key="trainer.device")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # this rank's GPU (NCCL and DDP use the current device)
        self.is_main = self.dist.is_main
        if run is not None and run.primary != self.is_main:
            raise RuntimeError(f"rank {self.dist.rank} was given a run dir opened with primary={run.primary}")
        # Rank 0 locks the folder (one run per folder) before reading anything in it.
        self._owns_run = run is None
        self.run = run if run is not None else rundir.RunDir(self.run_dir, primary=self.is_main)
        barrier(self.dist)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)

        self.data = build_data(
            cfg.data, seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size,
            device_type=self.device.type,
        )
        self._count_steps()

        # Identical initial weights on every rank, from a forked RNG: the caller's is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            try:
                model = create_model(cfg.model.name, num_classes=self.data.num_classes, **cfg.model.overrides())
            except (ValueError, TypeError, RuntimeError) as e:
                raise ConfigError(f"model {cfg.model.name!r}: {first_line(e)}") from None
        self.init_report = self._init_weights(model) if cfg.init else None
        model.to(self.device)
        if cfg.trainer.channels_last:
            model.to(memory_format=torch.channels_last)
        self.condenser = Condenser(model, self.total_steps, cfg.condense, from_current_stage=bool(cfg.init))
        # recipes: knowledge distillation (engine/distill.py)
        self.teacher = load_teacher(
            cfg.distill, self.data.num_classes, next(iter(self.data.val_loader))[0][:2], self.device,
        ) if cfg.distill.teacher else None
        self.compact_training = resolve_compact_training(cfg.trainer.compact_training, self.device)
        self.autocast_dtype = AUTOCAST_DTYPES[cfg.trainer.amp]  # validation allows fp16 on CUDA only
        # What a checkpoint saves and a resume restores (_resume fills it from a checkpoint).
        self.state = TrainState(
            model=model,
            optimizer=self.new_optimizer(model),
            ema=ModelEMA(model, cfg.trainer.ema_decay, warmup=cfg.trainer.ema_warmup) if cfg.trainer.ema_decay else None,
            scaler=torch.amp.GradScaler(self.device.type) if self.autocast_dtype == torch.float16 else None,
        )
        self.health = StepHealth(self.dist)  # per-step loss flags, looked at every log_every steps
        self._momentum_primed = False  # momentum buffers primed (see train_step)
        self._last_save = time.monotonic()
        self.last_checkpoint: Path | None = None
        self._stops: stop_signals.StopGuard | None = None
        self.identity = run_identity(cfg, self.data)
        self.finished = False  # resumed a run whose report.json is written: nothing to do
        self._resume()
        self.train_model = self._wrap(self.model)
        self._open_logs()
        log_run_start(self)

    # The TrainState's objects and counters, read-only, for callbacks and the loop below;
    # everything that changes them writes self.state.
    model = property(lambda self: self.state.model)
    optimizer = property(lambda self: self.state.optimizer)
    ema = property(lambda self: self.state.ema)
    scaler = property(lambda self: self.state.scaler)
    structure = property(lambda self: self.state.structure)
    step = property(lambda self: self.state.step)
    epoch = property(lambda self: self.state.epoch)
    batch_in_epoch = property(lambda self: self.state.batch_in_epoch)
    bad_steps = property(lambda self: self.state.bad_steps)

    # ------------------------------------------------------------------ set-up
    def _count_steps(self) -> None:
        """Steps per epoch and in all, the peak lr and the warmup length (optimizer steps)."""
        cfg = self.cfg
        check_accum(cfg.data.batch_size, self.dist.world_size, cfg.trainer.accum_steps)  # recipes
        self.steps_per_epoch = self.data.steps_per_epoch
        if cfg.trainer.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.trainer.max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} leaves no full training batch per rank; "
                "lower the batch size"
            )
        self.total_steps = cfg.trainer.epochs * self.steps_per_epoch
        self.peak_lr = resolve_lr(cfg.optim, cfg.data.batch_size)
        self.warmup_steps = round(cfg.sched.warmup_epochs * self.steps_per_epoch)

    def _open_logs(self) -> None:
        """metrics.jsonl/.csv and TensorBoard, the optional MLflow mirror and epochs.csv
        (rank 0 of an unfinished run only)."""
        folder = self.run_dir if self.is_main and not self.finished else None
        self.logger = MetricLogger(folder)
        # recipes: optional MLflow mirror of every logged scalar (engine/mlflow_logger.py)
        self.mlflow = (
            MlflowLogger(self.run_dir, config_to_dict(self.cfg), self.cfg.trainer.mlflow_uri)
            if self.cfg.trainer.mlflow and folder is not None else None
        )
        if self.mlflow is not None:
            self.logger = WithMlflow(self.logger, self.mlflow)
        # recipes: one wide row per epoch in epochs.csv (engine/epoch_log.py)
        self.epoch_log = EpochLog(folder, list(self.condenser.density()))

    def new_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The run's optimizer over ``model``'s parameters (built again when a resume changes them)."""
        return build_optimizer(model, self.cfg.optim, self.peak_lr, split_head=self.cfg.trainer.freeze_epochs > 0)

    def _init_weights(self, model: nn.Module):
        """init=PATH: pretrained weights and masks into the fresh model (a resume overrides them)."""
        report = init_model(
            model, self.cfg.init, weights=self.cfg.init_weights, class_names=list(self.data.class_names),
            restart=self.cfg.condense.restart, model_name=self.cfg.model.name,
            preprocess=self.data.eval_preprocess,
        )
        if self.is_main:
            log.info("weights from init=%s\n%s", self.cfg.init, report.table())
        return report

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.enabled:
            if self.cfg.trainer.sync_bn and self.structure is Structure.MASKED:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # keeps the Parameter objects
                self.state.model = model
            model = wrap_ddp(model, self.device)
        if self.cfg.trainer.compile:
            model = torch.compile(model)
        return model

    def _compact_training_due(self) -> bool:
        return (
            self.compact_training
            and self.structure is Structure.MASKED
            and bool(self.condenser.layers)
            and self.step >= self.condenser.final_step  # host integers first: done reads the device
            and self.condenser.done
        )

    def _swap_to_compact_training(self) -> None:
        """Second half of training: stop paying for pruned connections."""
        self.state.to_compact_training()
        self.train_model = self._wrap(self.model)
        log.info("step %d: all masks final, switched to compact training layers", self.step)

    def _resume(self) -> None:
        """Continue the run from its checkpoint (see :mod:`cdnv2.engine.resume`), or start afresh."""
        found = checkpoint_to_resume(self.cfg.resume, self.ckpt_dir)
        if found is None:
            if self.is_main:
                start_afresh(self.run, self.run_dir, self.ckpt_dir, replace=self.cfg.resume == "never")
            return
        state, path = found
        check_compatible(
            state, path, model_name=self.cfg.model.name, arch_kwargs=self.model.arch_kwargs(),
            class_names=self.data.class_names, total_steps=self.total_steps,
        )
        check_identity(state, path, self.identity, self.run_dir)
        if self.cfg.resume != "auto" and self.is_main:  # resume=PATH: the folder's run must be this one
            check_target_folder(self.run, self.run_dir, self.ckpt_dir, self.identity, self.total_steps)
        restore(self, state, path)
        self.last_checkpoint = path
        self.finished = run_finished(state, path, self.run_dir, self.total_steps)
        if self.is_main and not self.finished and self.cfg.resume == "auto":
            keep_fallback(path)
        if self.is_main and not self.finished:
            log.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

    # ------------------------------------------------------------------ saving
    def save(self, name: str = "last.pt") -> Path | None:
        """Rank 0 writes a checkpoint; refuse to persist non-finite weights.

        Every rank that calls it first looks at the steps since the last look, so a
        non-finite loss under nan_policy=raise stops the run before anything is written.
        """
        self._collect_health()
        if not self.is_main:
            return None
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"refusing to write a checkpoint: non-finite weights in {bad[:3]} at step {self.step}; "
                f"the last good checkpoint is {self.last_checkpoint}"
            )
        path = self.ckpt_dir / name
        state = checkpoint_state(self)
        if name == "last.pt":
            atomic_files.save_rotating(state, path)
            self.last_checkpoint = path
        else:
            atomic_files.atomic_save(state, path)
            if not (self.ckpt_dir / "last.pt").exists():  # a snapshot never exists without a last.pt
                atomic_files.save_rotating(state, self.ckpt_dir / "last.pt")
                self.last_checkpoint = self.ckpt_dir / "last.pt"
        return path

    # ------------------------------------------------------------------ training
    def _abortable(self):
        """Evaluation and conversion change no training state: a signal stops them at once."""
        return self._stops.abortable() if self._stops is not None else nullcontext()

    @contextmanager
    def _loader_deaths(self):
        """A killed loader worker (OOM killer, a signal sent to it alone) ends the run cleanly."""
        try:
            yield
        except RuntimeError as e:
            if "DataLoader worker" not in str(e):
                raise
            last = str(self.last_checkpoint) if self.last_checkpoint else None
            if self._stops is not None and self._stops.received is not None:
                raise TrainingInterrupted(self._stops.received, last, self.step) from None
            raise LoaderWorkerDied(
                f"{str(e).splitlines()[0]} Running out of memory is the usual cause: lower "
                f"data.num_workers or data.batch_size. The last checkpoint is {last or 'none yet'}; "
                "re-run the same command to resume."
            ) from None

    def fit(self) -> dict:
        try:
            if self.finished:
                return self._already_finished()
            with stop_signals.guard() as stops:
                self._stops = stops
                try:
                    with stops.deferring(), self._loader_deaths():
                        self._train_epochs()
                except stop_signals.StopSignal as e:  # during an evaluation: the state is a step boundary
                    path = self.save()
                    raise TrainingInterrupted(e.signum, str(path) if path else None, self.step) from None
                try:
                    with self._loader_deaths():
                        return self.finalize()
                except stop_signals.StopSignal as e:  # last.pt of the final step is already written
                    last = str(self.last_checkpoint) if self.last_checkpoint else None
                    raise TrainingInterrupted(e.signum, last, self.step) from None
        finally:
            self._stops = None
            self.logger.close()
            if self._owns_run:
                self.run.close()

    def _train_epochs(self) -> None:
        self._callback("on_fit_start")
        if self.teacher is not None:  # recipes: the teacher's accuracy, once per (re)start
            teacher = self.run_eval(self.teacher, "eval teacher")
            self.logger.log(self.step, self._epoch_float(), {"distill/teacher_top1": teacher.top1})
            if self.is_main:
                log.info("distillation teacher %s: val top1 %.2f%%", self.cfg.distill.teacher, teacher.top1)
        if self.structure is Structure.MASKED and self.condenser.step(self.step) and self.is_main:
            log.info("applied condensation stages due at step %d", self.step)
        if self._compact_training_due():
            self._swap_to_compact_training()
        while self.epoch < self.cfg.trainer.epochs:
            self.train_one_epoch()
            self.end_epoch()
            self._check_stop()

    def _already_finished(self) -> dict:
        report = show_finished(self.run_dir, self.step, self.total_steps, self.is_main)
        cleanup(self.dist)
        return report

    def train_one_epoch(self) -> None:
        epoch, start = self.epoch, self.batch_in_epoch
        self.data.set_epoch(epoch, start_batch=start)
        self.model.train()
        bar = Progress(
            self.steps_per_epoch - start, f"epoch {epoch + 1}/{self.cfg.trainer.epochs}",
            self.cfg.trainer.progress, self.cfg.trainer.log_every, self.is_main,
        )
        self._last_save = time.monotonic()
        self.epoch_log.start()
        tick, seen = time.perf_counter(), 0
        for images, targets in self.data.train_loader:
            if self.batch_in_epoch >= self.steps_per_epoch:
                break
            self.train_step(images, targets)
            seen += images.shape[0]
            self.epoch_log.add_images(images.shape[0] * self.dist.world_size)
            self.state.batch_in_epoch += 1
            self.after_step()
            self._callback("on_step_end")
            shown = {}
            if self.step % self.cfg.trainer.log_every == 0 or self.step == 1:
                shown = progress_loss(self._log_train(seen * self.dist.world_size, tick))
                tick, seen = time.perf_counter(), 0
            bar.update(1, **shown)
            self._check_stop()
        bar.close()

    def _mix(self, images, targets) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix of the whole batch (seeded by the step); hard targets otherwise."""
        o = self.cfg.optim
        if o.mixup_alpha > 0 or o.cutmix_alpha > 0:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
            return mixup_cutmix(images, targets, self.data.num_classes, o.mixup_alpha, o.cutmix_alpha, g)
        return images, targets

    def _forward_loss(self, images, target) -> torch.Tensor:
        """Mean loss of one (micro-)batch: to the device, forward, criterion, group lasso."""
        o = self.cfg.optim
        images = images.to(self.device, non_blocking=True)
        if self.cfg.trainer.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = target.to(self.device, non_blocking=True)
        ctx = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with ctx:
            logits = self.train_model(images)
            taught = teacher_logits(self.teacher, images, self.data.num_classes) if self.teacher is not None else None
        loss = F.cross_entropy(logits.float(), target, label_smoothing=o.label_smoothing)
        if taught is not None:  # recipes: soft targets of the teacher (engine/distill.py)
            loss = loss + self.cfg.distill.alpha * distill_loss(logits, taught, self.cfg.distill.temperature)
        if self.condenser.lasso_active(self.step) and self.structure is Structure.MASKED:
            loss = loss + self.condenser.lasso_penalty()
        return loss

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """One optimizer step, skipped on the device when the loss is not finite.

        Nothing here waits for the device: the loss's finite flag gates the fused
        optimizer and the EMA as a device tensor, and the host looks at the flags and
        losses every ``log_every`` steps and before every checkpoint (:meth:`_collect_health`).
        """
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, self.peak_lr, self.cfg.sched)
        set_lr(self.optimizer, lr, freeze_backbone=self.epoch < self.cfg.trainer.freeze_epochs)
        if not self._momentum_primed:  # once per process: see prime_momentum
            prime_momentum(self.optimizer)
            self._momentum_primed = True
        self.optimizer.zero_grad(set_to_none=True)
        # recipes: trainer.accum_steps micro-batches per optimizer step (engine/accumulate.py);
        # a non-finite loss poisons its gradients, so the scaler skips the step too.
        images, target = self._mix(images, targets)
        loss = accumulate_backward(
            self.train_model, images, target, self.cfg.trainer.accum_steps, self._forward_loss, self.scaler,
        )
        bad = self.health.record(self.step + 1, loss)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)  # fused SGD: the skip is decided on the device
            self.scaler.update()
        else:
            step_unless(self.optimizer, bad)
        if self.ema is not None:
            self.ema.update(self.model, apply=1.0 - bad)
        self.state.train_seconds += time.perf_counter() - t0

    def _collect_health(self) -> HealthWindow:
        """Look at the steps since the last look (one host sync); account for bad ones."""
        window = self.health.collect()
        self.epoch_log.add_window(window.loss, window.good)
        if window.bad_steps:
            self._bad_step(window.bad_steps)
        return window

    def _bad_step(self, steps: list[int]) -> None:
        """Count steps whose loss was not finite (the device already skipped them)."""
        for step in steps:
            self.state.bad_steps += 1
            lr = lr_at(step - 1, self.total_steps, self.warmup_steps, self.peak_lr, self.cfg.sched)
            where = (
                f"non-finite loss at step {step} (epoch {(step - 1) // self.steps_per_epoch + 1}, "
                f"lr {lr:.4g}); the last good checkpoint is {self.last_checkpoint or 'none yet'}"
            )
            apply_nan_policy(where, self.bad_steps, self.cfg.trainer.nan_policy, self.cfg.trainer.max_bad_steps)

    def after_step(self) -> None:
        """Count the step, apply due condensation stages, maybe swap to compact layers."""
        self.state.step += 1
        due = self.structure is Structure.MASKED and self.condenser.due(self.step)  # host integers only
        event = self.condenser.step(self.step) if due else None
        if self.structure is Structure.MASKED and self.condenser.fading(self.step):
            self.condenser.fade(self.step)  # recipes: the gentle step (condense.fade_fraction)
        if event is not None:
            if self.ema is not None:
                self.ema.sync_structure(self.model)
            # recipes: BN statistics of the pruned network (engine/bn_recal.py), before any save
            recal_images = recalibrate_after_condense(self)
            metrics = {f"condense/density_{k}": v for k, v in event.density.items()}
            metrics["condense/bn_recal_images"] = float(recal_images * self.dist.world_size)
            metrics.update({f"condense/stage_{k}": float(v) for k, v in event.stage.items()})
            self.logger.log(self.step, self._epoch_float(), metrics)
            if self.is_main:
                log.info(
                    "step %d: condensation stage %s, density %s; BN statistics re-estimated on %d images",
                    self.step, event.stage, {k: round(v, 4) for k, v in event.density.items()},
                    recal_images * self.dist.world_size,
                )
            if self.cfg.trainer.stage_snapshots:
                self.save(f"condense-step{self.step:07d}.pt")
            if self._compact_training_due():
                self._swap_to_compact_training()

    def _check_stop(self) -> None:
        """Stop on a signal, or write the periodic checkpoint, on every rank at the same step.

        One process: host flags, looked at every step. Under torchrun: one all-reduce of
        both flags every ``log_every`` steps, so a signal stops the run at the next such step.
        """
        received = self._stops.received if self._stops is not None else None
        stop = received is not None
        save_due = time.monotonic() - self._last_save > 60 * self.cfg.trainer.checkpoint_minutes
        if self.dist.enabled:
            if self.step % self.cfg.trainer.log_every:
                return
            stop, save_due = any_rank_each([stop, save_due], self.dist, self.device)
        if stop:
            path = self.save()
            raise TrainingInterrupted(received or signal.SIGTERM, str(path) if path else None, self.step)
        if save_due:
            self.save()
            self._last_save = time.monotonic()

    def _callback(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _epoch_float(self) -> float:
        return self.epoch + self.batch_in_epoch / self.steps_per_epoch

    def _log_train(self, images: int, since: float) -> HealthWindow:
        """Log the mean loss of the good steps since the last look; returns that window."""
        window = self._collect_health()  # waits for the device: the rate below is real
        self.logger.log(self.step, self._epoch_float(), train_metrics(self, window, images, since))
        return window

    def eval_model(self) -> nn.Module:
        return self.state.eval_model()

    def run_eval(self, model: nn.Module, desc: str) -> EvalResult:
        bar = Progress(len(self.data.val_loader), desc, self.cfg.trainer.progress, 10**9, self.is_main)
        with self._abortable():
            result = evaluate(
                model, self.data.val_loader, self.device,
                reduce=lambda t: all_reduce_sum(t, self.dist), autocast_dtype=self.autocast_dtype,
                channels_last=self.cfg.trainer.channels_last, progress=bar,
            )
        bar.close()
        return result

    def end_epoch(self) -> None:
        # Evaluate before counting the epoch: a stop during the evaluation saves a state
        # whose resume re-runs it.
        if self.structure is Structure.MASKED and self.condenser.fading(self.step):
            # recipes: weights are fading towards a step; statistics that fit them (bn_recal.py)
            images = recalibrate_after_condense(self)
            self.logger.log(self.step, self._epoch_float(), {"condense/bn_recal_images": float(images * self.dist.world_size)})
        result = self.run_eval(self.eval_model(), "eval")
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self.state.last_eval = {"epoch": self.epoch, **result.as_dict()}
        self.logger.log(self.step, float(self.epoch), {f"val/{k}": v for k, v in result.as_dict().items()})
        self._collect_health()
        self.epoch_log.write(epoch=self.epoch, step=self.step, lr=self.optimizer.param_groups[0]["lr"],
                             val=result.as_dict(), density=self.condenser.density(), device=self.device)
        if self.is_main:
            log.info(
                "epoch %d/%d: val top1 %.2f%% top5 %.2f%% loss %.4f (%s)",
                self.epoch, self.cfg.trainer.epochs, result.top1, result.top5, result.loss,
                "condensed" if self.condenser.done or self.structure is not Structure.MASKED else
                f"stage {self.condenser.stages()}",
            )
        fully_condensed = self.structure is not Structure.MASKED or self.condenser.done
        if fully_condensed and result.top1 > self.state.best_top1:
            # best.pt before last.pt: a failed or killed write of best.pt leaves last.pt at
            # the previous checkpoint, so the resume trains this epoch again and rewrites both.
            self.state.best_top1 = result.top1
            self.save("best.pt")
        self.save()
        self._callback("on_epoch_end")

    # ------------------------------------------------------------------ the end
    def finalize(self) -> dict:
        """Evaluate the masked model, convert, check parity, evaluate the compact model, report
        (:func:`cdnv2.engine.finalize.finish_run`); then the ``on_fit_end`` callbacks."""
        report = finish_run(self)
        self._callback("on_fit_end", report)
        cleanup(self.dist)
        return report


def train(cfg: TrainConfig, run_dir: str | Path, callbacks: Iterable[Callback] = ()) -> dict:
    """Run (or resume) a whole training run in ``run_dir``; returns the report dict.

    The folder is locked for the whole call (one run per folder); see
    :mod:`cdnv2.engine.run_dir` for resume, identity and never-overwrite rules.
    """
    validate_config(cfg)  # before the run directory is made
    # The process that acts as the main one (Trainer.is_main, from the same validated
    # environment) is the one that locks: a non-main rank never writes into the folder.
    with rundir.RunDir(run_dir, primary=distributed_env().is_main) as run:
        trainer = Trainer(cfg, run_dir, callbacks, run=run)
        run.claim()  # its checks passed: from here on the folder is this run's
        return trainer.fit()
