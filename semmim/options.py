"""The command line's shared option builders and parsers (``semmim`` and its subcommands).

Cheap on purpose: building the parser imports only :mod:`semmim.config` (no torch, no model),
so ``semmim --help`` answers at once. The options of a config dataclass are generated from its
fields (:func:`add_train_options`); every model ``--set`` key is listed by
:func:`model_keys_help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
import typing
from typing import Any

DATA_HELP = (
    "training data (default: the embedded procedural shapes, no download). SPEC is one of: "
    "synthetic[:N[:V]] (N training scenes, default 50000, V held-out, default 500); folder:PATH (images with a "
    "same-named .txt caption beside each, first line; sub-folder names become zero-shot classes); "
    "json:FILE (list of {image, caption|captions} or COCO captions); csv:FILE / tsv:FILE (header with "
    "image and caption columns, optional label); wds:PATTERN (webdataset .tar shards streamed: "
    "brace ranges, local globs, pipe:CMD, URLs, jpg/png + txt; needs --steps and the [wds] "
    "extra); wds-map:PATTERN (the same shards read into memory, map-style)"
)

TASK_DATA_HELP = (
    "retrieval / caption: any training data spec, or karpathy:FILE[,IMAGE_ROOT] (Karpathy-split "
    "COCO/Flickr30K JSON: train+restval to train, test to evaluate). vqa: synthetic[:N[:V]] "
    "(questions about the embedded scenes, default) or vqa:QUESTIONS.json,ANNOTATIONS.json"
    "[,IMAGE_DIR] (VQA v2 files; images COCO_<subtype>_<id>.jpg)"
)


class CLIError(Exception):
    """A user error: printed as ``semmim: error: ...`` with exit status 2, no traceback."""


def parse_value(text: str) -> Any:
    """``--set`` value: true/false -> bool, integers, floats, otherwise the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_sets(items: list[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``key=value`` items into (model overrides, ``train.`` overrides without the prefix)."""
    model, train = {}, {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--set expects key=value, got {item!r}")
        if key.startswith("train."):
            train[key[len("train.") :]] = parse_value(value)
        else:
            model[key] = parse_value(value)
    return model, train


def _flag(f: dataclasses.Field) -> str:
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def add_train_options(
    parser: argparse.ArgumentParser, cls: type | None = None, prefix: str = "train_"
) -> None:
    """One option per field of a config dataclass (default :class:`semmim.run_config.TrainConfig`;
    :class:`semmim.run_config.TaskConfig` with ``prefix="task_"``), from the field's type
    and help.

    ``--batch-size`` sets ``batch_size``; bools get ``--x / --no-x``; Literal types become choices.
    Every option defaults to None (= not given), so only what the user typed overrides a config.
    ``--steps`` and ``--epochs`` exclude each other.
    """
    from semmim.run_config import TrainConfig

    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    length = parser.add_mutually_exclusive_group() if {"steps", "epochs"} <= names else parser
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        default = f" (default: {f.default})" if f.default != "" else ""
        help_text = (f.metadata["help"] + default).replace("%", "%%")
        kw: dict[str, Any] = {"dest": f"{prefix}{f.name}", "default": None, "help": help_text}
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is typing.Literal:
            kw["choices"] = list(typing.get_args(hint))
        else:
            kw["type"], kw["metavar"] = hint, f.metadata.get("metavar")
        (length if f.name in ("steps", "epochs") else parser).add_argument(_flag(f), **kw)


def train_overrides(
    args: argparse.Namespace, cls: type | None = None, prefix: str = "train_"
) -> dict[str, Any]:
    """The config fields given on the command line: ``{"batch_size": 8, ...}`` (default
    :class:`semmim.run_config.TrainConfig`, see :func:`add_train_options`)."""
    from semmim.run_config import TrainConfig

    cls = cls or TrainConfig
    given = {f.name: getattr(args, f"{prefix}{f.name}") for f in dataclasses.fields(cls)}
    return {k: v for k, v in given.items() if v is not None}


def add_run_options(
    parser: argparse.ArgumentParser, default_preset: str, scratch_only: bool = False
) -> None:
    """--preset, --resume, --overwrite, --allow-changes, the TrainConfig options and --set."""
    from semmim.config import PRESETS

    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help=f"model size (default: {default_preset}; on --resume the checkpoint's)"
        + ("; only without --ckpt (from scratch)" if scratch_only else ""),
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest intact checkpoint in OUT/checkpoints with its model "
        "config, optimizer, schedule, RNG and data position. Run options given now (e.g. "
        "--steps, --num-workers) override the saved ones; a saved --stop-at is dropped; "
        "--preset and model --set keys are checked, then ignored",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="OUT already holds a run and you want a new one there: move the old run aside to "
        "OUT.old-<time> first (nothing is deleted). Without it (or --resume) such an OUT is "
        "refused",
    )
    parser.add_argument(
        "--allow-changes",
        action="store_true",
        help="with --resume: continue even though the batch size, accumulation, seed, data, "
        "held-out split or number of processes differ from the checkpoint's (refused otherwise)",
    )
    add_train_options(parser)
    parser.add_argument(
        "--set",
        dest="sets",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        help="config overrides, repeatable: model keys like vision.depth=4, "
        "mim.target=pixel, masking.strategy=random, mim.enabled=false; run keys "
        "like train.lr=1e-4, train.warmup_steps=100, train.weight_decay=0.05, "
        "train.grad_clip=1.0, train.flip=none (every train option above is also train.<name>; "
        "every model key is listed at the end of 'semmim train --help')",
    )


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "|".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if value == "" else str(value)


def model_keys() -> list[tuple[str, str, str]]:
    """Every model ``--set`` key as (dotted key, type, default), read from the fields of
    :class:`semmim.config.SemMIMConfig`'s section dataclasses (the class defaults; a preset
    changes the sizes). Builds no config, imports no torch."""
    from semmim.config import SemMIMConfig

    keys = []
    for section in dataclasses.fields(SemMIMConfig):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            keys.append((f"{section.name}.{f.name}", _type_name(hints[f.name]), _show(default)))
    return keys


def model_keys_help(width: int = 96) -> str:
    """The model ``--set`` keys as help text: ``key: type = default`` in columns."""
    items = [f"{k}: {t} = {d}" for k, t, d in model_keys()]
    cell = max(map(len, items)) + 2
    cols = max(1, (width - 2) // cell)
    rows = -(-len(items) // cols)
    lines = [
        "  "
        + "".join(
            items[r + c * rows].ljust(cell) for c in range(cols) if r + c * rows < len(items)
        ).rstrip()
        for r in range(rows)
    ]
    head = textwrap.fill(
        "model keys (--set KEY=VALUE; the config classes' defaults, which a --preset changes: "
        "see semmim.config.PRESETS):",
        width,
    )
    return head + "\n" + "\n".join(lines)
