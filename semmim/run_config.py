"""The run's settings beside the model's: :class:`TrainConfig` (``semmim train``) and
:class:`TaskConfig` (``semmim finetune``'s extra options).

Each field carries its CLI help text (:func:`opt`); the ``semmim train`` / ``semmim finetune``
options are generated from these fields (:mod:`semmim.options`), and checkpoints save them as plain
dicts (``to_dict`` / ``from_dict``). The model's configuration is :mod:`semmim.config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from semmim.config import check_in_range, check_positive, check_types

__all__ = ["TrainConfig", "TaskConfig", "opt", "REPORTERS", "parse_reporters", "parse_init"]

REPORTERS = ("tensorboard", "wandb")  # --report-to (semmim.train.tracking)
INIT_KINDS = ("albef",)  # --init KIND:FILE (semmim.albef)


def parse_reporters(spec: str) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` → ``("tensorboard", "wandb")`` (blanks and repeats dropped).

    ValueError ``report_to: unknown reporter …`` naming the first unknown name.
    """
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(
            f"report_to: unknown reporter {unknown[0]!r}; valid: {', '.join(REPORTERS)} "
            "(comma-separated)"
        )
    return tuple(dict.fromkeys(names))


def parse_init(spec: str) -> tuple[str, str] | None:
    """``"albef:FILE"`` → ``("albef", "FILE")``; ``""`` → None. ValueError naming ``init``."""
    if not spec:
        return None
    kind, sep, path = spec.partition(":")
    if not sep or kind not in INIT_KINDS or not path:
        raise ValueError(
            f"init: expected {' or '.join(k + ':FILE' for k in INIT_KINDS)} (e.g. "
            f"albef:ALBEF.pth), got {spec!r}"
        )
    return kind, path


def opt(default: Any, help: str, metavar: str | None = None, flag: str | None = None) -> Any:
    """A TrainConfig field with its ``semmim train`` help text (the CLI is generated from these)."""
    meta = {"help": help, "metavar": metavar, "flag": flag}
    return field(default=default, metadata={k: v for k, v in meta.items() if v is not None})


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run that is not the model.

    Each field is a ``semmim train --<field-name>`` option and a ``--set train.<field>=...`` key;
    the help texts below are the CLI's. The run's length is ``steps`` or, with ``steps=0``,
    ``epochs`` passes over the training pairs (exactly one of them > 0).
    """

    data: str = opt("", "training data (default: the embedded shapes); see 'data specs'", "SPEC")
    out: str = opt("runs/semmim", "run directory", "DIR")
    steps: int = opt(400, "optimizer steps (0 = derive from --epochs)", "N")
    epochs: float = opt(0.0, "passes over the training pairs, instead of --steps", "E")
    batch_size: int = opt(
        32, "pairs per process per micro-batch (effective: × accum-steps × processes)", "B"
    )
    accum_steps: int = opt(1, "micro-batches per optimizer step (gradient accumulation)", "N")
    lr: float = opt(3e-4, "peak learning rate (AdamW)", "LR")
    min_lr_ratio: float = opt(0.05, "cosine floor as a fraction of --lr", "R")
    weight_decay: float = opt(0.05, "AdamW weight decay on weight matrices", "WD")
    beta1: float = opt(0.9, "AdamW beta1", "B1")
    beta2: float = opt(0.98, "AdamW beta2", "B2")
    warmup_steps: int = opt(-1, "linear warm-up steps (-1 = 5% of the steps)", "N")
    grad_clip: float = opt(1.0, "gradient-norm clip (0 = off)", "C")
    log_every: int = opt(10, "log (CSV row, progress bar) every N steps", "N")
    diag_every: int = opt(
        0,
        "compute the training diagnostics (teacher entropy, prototypes in use, agreement, mask "
        "overlap; CSV diag_* columns, diagnostics.png) every N steps (0 = every --log-every)",
        "N",
    )
    ckpt_every: int = opt(500, "checkpoint every N steps (and at the end)", "N")
    keep_ckpts: int = opt(2, "checkpoints kept (the newest N)", "N")
    stop_at: int = opt(
        0,
        "stop with a checkpoint after this step as if interrupted, keeping the schedule of "
        "--steps (time-boxed jobs; 0 = off; never carried into a --resume)",
        "STEP",
    )
    num_workers: int = opt(2, "DataLoader worker processes (0 = load in this process)", "N")
    seed: int = opt(0, "seed of init, data order, augmentation and the per-step seeds", "S")
    split_seed: int = opt(
        0, "seed of the held-out split (and of the embedded scenes), independent of --seed", "S"
    )
    val_size: float = opt(
        0.1,
        "held-out images: fraction (<1) or count (at most 1000; the embedded data holds out V)",
        "X",
    )
    validation: float = opt(
        0.0,
        "carve this many training images (fraction <1 or count) into a validation split and "
        "evaluate on it instead of the held-out split, which the run then never reads: for "
        "choosing settings (0 = off)",
        "X",
    )
    max_text_len: int = opt(40, "caption tokens kept (capped by the model's text.max_len)", "T")
    crop_scale_min: float = opt(
        -1.0, "random-resized-crop minimum area in (0, 1] (-1 = the data's choice)", "X"
    )
    flip: Literal["auto", "swap", "none"] = opt(
        "auto", "horizontal flip: swap = flip and swap left/right in the caption; auto = data's"
    )
    device: Literal["auto", "cuda", "cpu"] = opt("auto", "auto = CUDA when available")
    amp: Literal["auto", "bf16", "off"] = opt(
        "auto", "mixed precision: auto = bf16 autocast on CUDA, fp32 on CPU; bf16 = on any device"
    )
    compile: bool = opt(False, "wrap the model in torch.compile")
    grad_checkpointing: bool = opt(False, "recompute transformer blocks in backward (less memory)")
    threads: int = opt(0, "torch intra-op threads of this process (0 = torch's default)", "N")
    eval_at_end: bool = opt(True, "evaluate the held-out split at the end", flag="eval")
    eval_rerank_k: int = opt(16, "ITM re-ranked candidates per query at the end (0 = ITC)", "K")
    eval_batch_size: int = opt(64, "encoding batch size of the final evaluation", "B")
    report_to: str = opt(
        "",
        "experiment trackers, comma-separated: tensorboard (OUT/tensorboard), wandb (offline "
        "unless WANDB_MODE=online or an API key is set; OUT/wandb): the log.csv scalars and "
        "diagnostics, the plots, the configs (extras semmim[tensorboard] / semmim[wandb])",
        "LIST",
    )
    init: str = opt(
        "",
        "pre-training only: start from released weights: albef:FILE (an ALBEF checkpoint mapped "
        "onto the model; what does not map is listed in OUT/init_report.txt); a --resume ignores "
        "it",
        "SPEC",
    )
    fsdp: bool = opt(
        False,
        "under torchrun: shard the model, its EMA copy and the AdamW state over the processes "
        "(FSDP2) instead of replicating them (DDP); checkpoints become sharded step_<N>/ "
        "directories (torch.distributed.checkpoint), resumable on another process count",
    )

    def __post_init__(self) -> None:
        if isinstance(self.amp, bool):  # older configs: amp=True/False
            object.__setattr__(self, "amp", "auto" if self.amp else "off")
        try:
            self._validate()
        except ValueError as e:
            raise ValueError(f"train.{e}") from None

    def _validate(self) -> None:
        check_types(self)
        for name in ("batch_size", "accum_steps", "log_every", "ckpt_every", "keep_ckpts"):
            check_positive(self, name)
        check_positive(self, "max_text_len", "lr")
        for name in (
            "steps",
            "epochs",
            "stop_at",
            "diag_every",
            "num_workers",
            "threads",
            "weight_decay",
            "grad_clip",
            "eval_rerank_k",
            "val_size",
            "validation",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        check_positive(self, "eval_batch_size")
        check_in_range(self, "min_lr_ratio", 0.0, 1.0)
        check_in_range(self, "beta1", 0.0, 1.0, hi_open=True)
        check_in_range(self, "beta2", 0.0, 1.0, hi_open=True)
        if self.warmup_steps < -1:
            raise ValueError(f"warmup_steps: must be >= 0 or -1, got {self.warmup_steps}")
        if (self.steps > 0) == (self.epochs > 0):
            raise ValueError(
                f"steps: the run length is steps > 0 or (with steps=0) epochs > 0, exactly one; "
                f"got steps={self.steps}, epochs={self.epochs}"
            )
        if self.fsdp and self.compile:
            raise ValueError(
                "fsdp: --fsdp with --compile is not supported (the combination is untested); "
                "drop one of them"
            )
        if not (self.crop_scale_min == -1.0 or 0 < self.crop_scale_min <= 1):
            raise ValueError(f"crop_scale_min: must be in (0, 1] or -1, got {self.crop_scale_min}")
        parse_reporters(self.report_to)
        parse_init(self.init)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins (JSON-safe), e.g. for checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError naming them."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"train.{unknown[0]}: unknown key; valid keys of train: {valid}")
        return cls(**d)

    def override(self, overrides: dict[str, Any]) -> TrainConfig:
        """Copy with ``{"field": value}`` changes; unknown fields raise ValueError naming them.

        Giving ``epochs`` without ``steps`` sets ``steps=0`` (the run is measured in epochs).
        """
        valid = [f.name for f in fields(self)]
        for key in overrides:
            if key not in valid:
                raise ValueError(f"train.{key}: unknown key; valid keys of train: {valid}")
        changes = dict(overrides)
        if "epochs" in changes and "steps" not in changes:
            changes["steps"] = 0
        return replace(self, **changes)


# ---------------------------------------------------------------------------------- fine-tuning
@dataclass(frozen=True)
class TaskConfig:
    """Options of ``semmim finetune`` beyond the run's :class:`TrainConfig` (each field is an
    option of that command; saved in checkpoints for an exact resume). The tasks themselves are
    in :mod:`semmim.downstream.tasks`."""

    init: str = opt(
        "",
        "pre-training checkpoint to start from: run dir, checkpoints dir or step_*.pt (its model "
        "config is used); omitted = from scratch (random init, --preset)",
        "PATH",
        flag="ckpt",
    )
    eval_data: str = opt(
        "", "evaluate on this data spec instead of the held-out split of --data", "SPEC"
    )
    label_smoothing: float = opt(0.1, "caption: label smoothing of the LM loss", "E")
    beam_size: int = opt(3, "caption: beam width at evaluation (1 = greedy)", "K")
    max_gen_len: int = opt(30, "caption: most generated tokens", "T")
    num_answers: int = opt(3129, "vqa: answer classes (the most frequent training answers)", "N")
    questions_per_image: int = opt(3, "vqa: questions per embedded scene (of 6 kinds)", "Q")

    def __post_init__(self) -> None:
        try:
            check_types(self)
            check_positive(self, "beam_size", "max_gen_len", "num_answers", "questions_per_image")
            check_in_range(self, "label_smoothing", 0.0, 1.0, hi_open=True)
            if self.questions_per_image > 6:
                raise ValueError(f"questions_per_image: at most 6, got {self.questions_per_image}")
        except ValueError as e:
            raise ValueError(f"task.{e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskConfig:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(
                f"task.{unknown[0]}: unknown key; valid: {list(cls.__dataclass_fields__)}"
            )
        return cls(**d)
