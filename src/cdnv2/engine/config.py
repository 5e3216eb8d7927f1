"""Typed configuration of a training run.

These dataclasses are the engine's only input. The CLI registers them as Hydra's
structured schema, so a typo or a wrong type fails at composition with the key's
full name; the engine itself never imports Hydra.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..condense import CondenseConfig
from ..data import DataConfig
from .distill import DistillConfig

# The names a string key accepts (cdnv2.engine.validation checks them).
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "linear", "constant")
AMP_MODES = ("none", "bf16", "fp16")
PROGRESS_MODES = ("auto", "bar", "lines", "none")
NAN_POLICIES = ("raise", "skip")
RESUME_MODES = ("auto", "never")


@dataclass
class ModelConfig:
    """A registered model and optional architecture overrides (None: the variant's value)."""

    name: str = "cdnv2_tiny"  # any name from cdnv2.list_models()
    stages: Optional[list[int]] = None  # dense layers per block
    growth: Optional[list[int]] = None  # growth rate per block
    bottleneck: Optional[int] = None  # LGC width = bottleneck * growth
    lgc_groups: Optional[int] = None  # G of the learned group conv
    lgc_condense: Optional[int] = None  # C of the learned group conv
    conv3x3_groups: Optional[int] = None  # groups of the 3x3 conv
    sfr: Optional[bool] = None  # sparse feature reactivation on/off
    sfr_groups: Optional[int] = None  # G of SFR
    sfr_condense: Optional[int] = None  # C of SFR
    sfr_zero_init: Optional[bool] = None  # start SFR as a no-op
    stem_stride: Optional[int] = None  # 2 for 224 inputs, 1 for 32
    fc_channel: Optional[int] = None  # hidden head width

    def overrides(self) -> dict[str, Any]:
        return {
            k: v for k, v in dataclasses.asdict(self).items() if k != "name" and v is not None
        }


@dataclass
class OptimConfig:
    """SGD with Nesterov momentum (the papers') or AdamW; weight decay on conv/linear weights only."""

    name: str = "sgd"  # sgd | adamw (configs/optim/)
    lr: Optional[float] = None  # absolute lr; None: base_lr * batch_size / ref_batch_size
    base_lr: float = 0.1  # lr of the recipe at ref_batch_size
    ref_batch_size: int = 64  # global batch the recipe's base_lr was tuned for
    momentum: float = 0.9  # SGD momentum (sgd only)
    nesterov: bool = True  # Nesterov momentum (sgd only)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas (adamw only)
    eps: float = 1e-8  # AdamW epsilon (adamw only)
    weight_decay: float = 1e-4  # on conv/linear weights, not BN or biases
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    mixup_alpha: float = 0.0  # 0: mixup off
    cutmix_alpha: float = 0.0  # 0: CutMix off
    grad_clip: Optional[float] = None  # max global grad norm; None: no clipping
    head_lr_scale: float = 1.0  # classifier lr = head_lr_scale x lr (fine-tuning: e.g. 10)


@dataclass
class SchedConfig:
    """Per-iteration lr schedule after a linear warmup: cosine | step | linear | constant."""

    name: str = "cosine"  # cosine | step | linear | constant (configs/sched/)
    warmup_epochs: float = 0.0  # linear warmup length
    warmup_start_factor: float = 0.25  # warmup starts at this fraction of the lr
    min_lr: float = 0.0  # cosine and linear: final lr; step: floor
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of training
    decay_rate: float = 0.1  # step: lr factor at each milestone


@dataclass
class TrainerConfig:
    """How the loop runs: length, device, precision, checkpoints, logging."""

    epochs: int = 20  # training epochs
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 autocast (bf16 also on CPU)
    channels_last: bool = False  # NHWC memory format (CUDA)
    compile: bool = False  # torch.compile the training model
    ema_decay: Optional[float] = None  # EMA of weights, evaluated and exported; None: off
    ema_warmup: bool = True  # ramp the EMA decay up as (1+t)/(10+t) (timm); false: fixed
    compact_training: str = "auto"  # auto | true | false; auto: per device (docs/gpu.md)
    sync_bn: bool = False  # SyncBatchNorm in distributed runs
    checkpoint_minutes: float = 10.0  # also write last.pt this often within an epoch
    stage_snapshots: bool = True  # keep a checkpoint at every condensation stage
    log_every: int = 20  # steps between log lines / TensorBoard points
    progress: str = "auto"  # auto | bar | lines | none
    nan_policy: str = "raise"  # raise | skip non-finite losses
    max_bad_steps: int = 10  # with nan_policy=skip: give up after this many
    parity_samples: int = 16  # validation images used for the compact parity check
    max_steps_per_epoch: Optional[int] = None  # cap steps (smoke tests)
    deterministic: str = "auto"  # auto (exact on CPU, fast on CUDA) | true | false; set by the CLI
    threads: Optional[int] = None  # torch intra-op threads, set by the CLI; None: torch's default
    freeze_epochs: int = 0  # first epochs train only the classifier (backbone lr 0)
    mlflow: bool = False  # also log to MLflow (the mlflow extra)
    mlflow_uri: Optional[str] = None  # MLflow tracking URI; None: SQLite store <run dir>/mlflow.db
    accum_steps: int = 1  # micro-batches per optimizer step; data.batch_size stays the step's batch


@dataclass
class TrainConfig:
    """The whole run: composed by Hydra from configs/, or built directly in Python."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    condense: CondenseConfig = field(default_factory=CondenseConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0  # one seed for init, data order and augmentation
    resume: str = "auto"  # auto | never | path to a checkpoint
    init: Optional[str] = None  # start from these weights (any cdnv2 or official file); not a resume
    init_weights: str = "ema"  # ema (when the file has them) | raw
    name: Optional[str] = None  # optional suffix of the run directory
    sweep_name: Optional[str] = None  # multirun folder (CLI only); None: from the overrides


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)

