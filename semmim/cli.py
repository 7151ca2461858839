"""The ``semmim`` command line (also ``python -m semmim``): ``train``, ``finetune``, ``eval``,
``ablate``, ``data``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import textwrap
import typing
from typing import Any

DEFAULT_PRESET = "small"

_DATA_HELP = (
    "training data (default: the embedded procedural shapes, no download). SPEC is one of: "
    "synthetic[:N[:V]] (N training scenes, default 50000, V held-out, default 500); folder:PATH (images with a "
    "same-named .txt caption beside each, first line; sub-folder names become zero-shot classes); "
    "json:FILE (list of {image, caption|captions} or COCO captions); csv:FILE / tsv:FILE (header with "
    "image and caption columns, optional label); wds:PATTERN (webdataset .tar shards, brace ranges "
    "and globs, jpg/png + txt)"
)

EPILOG = """examples:
  semmim train                                   # small preset, embedded data, then held-out eval
  semmim train --preset tiny --steps 50 --out runs/tiny
  semmim train --data folder:/usr/share/tuxpaint/stamps --steps 500 --lr 3e-4 --out runs/tux
  semmim train --out runs/tux --resume           # continue exactly where the run stopped
  semmim train --set mim.target=pixel --set train.lr=1e-4 masking.strategy=random
  torchrun --nproc_per_node 8 -m semmim train --preset base --data json:coco.json --epochs 20
  semmim eval --ckpt runs/tux                    # retrieval R@1/5/10 + zero-shot, table + JSON
  semmim finetune retrieval --ckpt runs/tiny --data synthetic:2000:100 --steps 200 --out runs/ret
  semmim finetune vqa --ckpt runs/tiny --steps 300 --out runs/vqa    # embedded shape questions
  semmim finetune caption --ckpt runs/tux --data folder:/usr/share/tuxpaint/stamps --out runs/cap
  semmim eval --task retrieval --ckpt runs/tiny --data synthetic:2000:100   # zero-shot retrieval
  semmim eval --task vqa --ckpt runs/vqa         # VQA accuracy + majority baselines, table + JSON
  semmim ablate --preset tiny --seeds 0 1 2 --steps 300 --set loss.mlm=0 --out runs/ablate
  semmim ablate --variants default,albef centre_all=mim.center_over=all --seeds 0 1 --out runs/ab
"""

_TASK_DATA_HELP = (
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
    """One option per field of a config dataclass (default :class:`semmim.config.TrainConfig`;
    :class:`semmim.downstream.tasks.TaskConfig` with ``prefix="task_"``), from the field's type
    and help.

    ``--batch-size`` sets ``batch_size``; bools get ``--x / --no-x``; Literal types become choices.
    Every option defaults to None (= not given), so only what the user typed overrides a config.
    ``--steps`` and ``--epochs`` exclude each other.
    """
    from semmim.config import TrainConfig

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
    :class:`semmim.config.TrainConfig`, see :func:`add_train_options`)."""
    from semmim.config import TrainConfig

    cls = cls or TrainConfig
    given = {f.name: getattr(args, f"{prefix}{f.name}") for f in dataclasses.fields(cls)}
    return {k: v for k, v in given.items() if v is not None}


def _add_run_options(
    parser: argparse.ArgumentParser, default_preset: str, scratch_only: bool = False
) -> None:
    """--preset, --resume, --allow-changes, the TrainConfig options and --set."""
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
        "train.grad_clip=1.0, train.flip=none (every train option above is also train.<name>)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``semmim --help``)."""
    from semmim.config import PRESETS

    parser = argparse.ArgumentParser(
        prog="semmim",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="SemMIM vision-language pre-training (ALBEF + semantic masked image modeling): "
        "train on the embedded default or real data, evaluate retrieval.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,finetune,eval,ablate,data}"
    )

    tr = sub.add_parser(
        "train",
        help="pre-train (or resume); evaluates the held-out split at the end",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description=textwrap.fill(
            "Pre-train SemMIM. Writes OUT/log.csv (every logged step), OUT/loss.png, "
            "OUT/checkpoints/ (atomic, checksummed; 'latest' pointer), OUT/eval.json + eval.txt "
            "(held-out retrieval at the end) and OUT/summary.json. Ctrl-C / SIGTERM finish the "
            "current step, write a checkpoint and exit with status 130. Under torchrun it runs "
            "DDP (NCCL on GPUs, gloo on CPU).",
            96,
        )
        + "\n\n"
        + textwrap.fill("data specs (--data SPEC): " + _DATA_HELP, 96),
    )
    _add_run_options(tr, DEFAULT_PRESET)

    ft = sub.add_parser(
        "finetune",
        help="fine-tune a pre-training checkpoint: retrieval, vqa or caption",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description=textwrap.fill(
            "Fine-tune on a downstream task with the training loop of 'semmim train' (same "
            "progress bar, OUT/log.csv, OUT/loss.png, atomic checkpoints, exact --resume, DDP, "
            "bf16 autocast), starting from a pre-training checkpoint (--ckpt) or from scratch. "
            "retrieval: ITC + ITM with image-aware negatives, evaluated by ITC top-k then ITM "
            "re-rank (and the starting checkpoint's zero-shot numbers beside it); vqa: answer "
            "classifier, official VQA accuracy vs the majority baselines, OUT/vqa_results.json "
            "in the submission format; caption: text decoder initialised from the text + fusion "
            "encoders, beam search, BLEU/METEOR/ROUGE-L/CIDEr (pycocoevalcap). The metric table "
            "is written to OUT/eval.txt and OUT/eval.json.",
            96,
        )
        + "\n\n"
        + textwrap.fill("data specs (--data SPEC): " + _TASK_DATA_HELP + ". " + _DATA_HELP, 96),
    )
    ft.add_argument("task", choices=["retrieval", "vqa", "caption"], help="the downstream task")
    from semmim.downstream.tasks import TaskConfig

    add_train_options(ft, TaskConfig, "task_")
    _add_run_options(ft, "tiny", scratch_only=True)

    ev = sub.add_parser(
        "eval",
        help="retrieval R@1/5/10 (ITC, then ITM re-rank) and zero-shot classification",
        description="Evaluate a checkpoint: image->text and text->image retrieval R@1/5/10 and mean "
        "recall, ranked by ITC similarity and then with the top-k re-ranked by ITM "
        "(both rows printed), plus zero-shot classification when the data has class "
        "names. Prints a table and writes JSON.",
    )
    ev.add_argument(
        "--ckpt",
        required=True,
        metavar="PATH",
        help="run directory, checkpoints directory, or a step_*.pt file",
    )
    ev.add_argument(
        "--data",
        metavar="SPEC",
        default=None,
        help="data to evaluate (default: the run's training data spec). " + _DATA_HELP,
    )
    ev.add_argument(
        "--split",
        choices=["val", "all"],
        default="val",
        help="val = the held-out split made as in training (default); all = every pair",
    )
    ev.add_argument(
        "--rerank-k",
        type=int,
        default=16,
        help="ITM re-ranked candidates per query (default 16; 0 = ITC only)",
    )
    ev.add_argument(
        "--task",
        choices=["pretrain", "retrieval", "vqa", "caption"],
        default=None,
        help="what to evaluate (default: the checkpoint's task). pretrain: held-out retrieval + "
        "zero-shot classification; retrieval: the same on retrieval data (karpathy:FILE "
        "evaluates its test split; a pre-training checkpoint gives the zero-shot numbers); "
        "vqa: VQA accuracy vs majority baselines + vqa_results.json; caption: BLEU/METEOR/"
        "ROUGE-L/CIDEr + captions.json (vqa and caption need a checkpoint of that task)",
    )
    ev.add_argument(
        "--beam-size", type=int, default=None, help="caption: beam width (default: the run's)"
    )
    ev.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default 64)")
    ev.add_argument("--num-workers", type=int, default=2, help="image loading workers (default 2)")
    ev.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ev.add_argument(
        "--json",
        metavar="FILE",
        default=None,
        help="where to write the results (default: eval.json beside the run)",
    )

    ab = sub.add_parser(
        "ablate",
        help="a grid of variants x seeds on one held-out split: mean ± std table, paired "
        "differences, plot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description=textwrap.fill(
            "Train and evaluate every (variant, seed) of a grid with the training loop of "
            "'semmim train', each in OUT/<variant>/seed_<s>/, all on ONE held-out split "
            "(--split-seed, recorded in the table). Writes OUT/ablation.txt / .json / .csv "
            "(per variant: mean ± std over seeds of held-out ITC and ITM mean recall, ITC R@1 "
            "both ways, zero-shot top-1 when the data has classes, training time; each "
            "variant's difference from 'default' paired by seed), OUT/ablation_runs.csv and "
            "OUT/ablation.png (every seed a point). Run the same command again to resume: "
            "finished runs are not redone, an interrupted run continues from its checkpoint. "
            "Ctrl-C / SIGTERM stop the current run with a checkpoint (exit status 130). "
            "--jobs N trains N runs at once, each in its own process; --validation X evaluates "
            "every run on X training images carved out as a validation split instead of the "
            "held-out split (for choosing settings).",
            96,
        )
        + "\n\n"
        + textwrap.fill(
            "variants (--variants): built-in names default, albef (mim.enabled=false), pixel "
            "(mim.target=pixel), random_mask (masking.strategy=random), no_text_target "
            "(mim.text_in_target=false), psi_text_cls (mim.psi=text_cls), comma-separated or "
            "as separate words; or new ones as NAME=KEY=VALUE[,KEY=VALUE...] with --set keys "
            "(e.g. centre_all=mim.center_over=all lowlr=train.lr=1e-4). Default: all six "
            "built-in variants.",
            96,
        )
        + "\n\n"
        + textwrap.fill("data specs (--data SPEC): " + _DATA_HELP, 96),
    )
    ab.add_argument(
        "--preset", choices=list(PRESETS), default="tiny", help="model size (default: tiny)"
    )
    ab.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        default=None,
        help="the grid's rows (see above; default: all six built-in variants)",
    )
    ab.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="runs trained at once, each in its own process with its output in the run's "
        "ablate_run.log (default 1: one after another in this process); with N > 1 and no "
        "--threads each run gets (CPU cores // N) intra-op threads",
    )
    ab.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0, 1, 2],
        metavar="S",
        help="training seeds, one run per variant and seed (default: 0 1 2); use this, not --seed",
    )
    add_train_options(ab)
    ab.add_argument(
        "--set",
        dest="sets",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        help="config overrides for every run of the grid (as in 'semmim train'); a variant's "
        "own overrides apply on top",
    )

    da = sub.add_parser(
        "data",
        help="open a data spec, report counts and skipped samples",
        description="List a --data spec: pairs, images, classes, held-out split "
        "and skipped samples; --check decodes every image.",
    )
    da.add_argument("spec", nargs="?", default=None, metavar="SPEC", help=_DATA_HELP)
    da.add_argument("--check", action="store_true", help="decode every image and count failures")
    da.add_argument("--val-size", type=float, default=0.1, help="held-out fraction or count")
    return parser


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
    )


def _resume_configs(args: argparse.Namespace, explicit: dict[str, Any], model_sets: dict[str, Any]):
    """``--resume``: (checkpoint, model config, run config) of OUT's newest intact checkpoint,
    with the run options given now applied and the resume contract checked."""
    from semmim.checkpoint import TRAIN_KEYS, load_latest_intact
    from semmim.config import SemMIMConfig, TrainConfig
    from semmim.train import check_resume

    out = explicit.get("out", TrainConfig.out)
    try:
        checkpoint = load_latest_intact(os.path.join(out, "checkpoints"), "cpu", TRAIN_KEYS)
    except FileNotFoundError as err:
        raise CLIError(f"--resume: {err}") from None
    state = checkpoint[0]
    model_cfg = SemMIMConfig.from_dict(state["config"])
    if model_sets:
        model_cfg.override(model_sets)  # a misspelled key is an error, as on a fresh run
    if args.preset or model_sets:
        logging.getLogger("semmim").warning(
            "--resume: the checkpoint's model config is used; --preset/model --set ignored"
        )
    saved = TrainConfig.from_dict({**state["train_config"], "stop_at": 0})
    tcfg = saved.override(explicit)
    if not args.allow_changes:  # refuse before the data is opened (train() logs changes)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_resume(state, checkpoint[1], tcfg, world_size, False)
    return checkpoint, model_cfg, tcfg


def _report(summary: dict[str, Any], tcfg) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"trained {summary['step']}/{summary['total_steps']} steps in "
            f"{summary['seconds']:.0f} s ({summary['pairs_per_s']:.1f} pairs/s, data wait "
            f"{100 * summary['data_wait_share']:.1f}% of step time); skipped samples: "
            f"{summary['skipped']['total']} {summary['skipped']}; run dir: {tcfg.out}"
        )
    return 130 if summary["interrupted"] else 0


def cmd_train(args: argparse.Namespace) -> int:
    """``semmim train``."""
    from semmim.config import TrainConfig, from_preset
    from semmim.data import DataError
    from semmim.train import open_run_data, train

    model_sets, train_sets = parse_sets(args.sets)
    explicit = train_overrides(args)
    explicit.update(train_sets)
    checkpoint = None
    try:
        if args.resume:
            checkpoint, model_cfg, tcfg = _resume_configs(args, explicit, model_sets)
        else:
            model_cfg = from_preset(args.preset or DEFAULT_PRESET, model_sets)
            tcfg = TrainConfig().override(explicit)
        source = open_run_data(tcfg)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    try:
        summary = train(
            model_cfg,
            tcfg,
            resume=args.resume,
            source=source,
            checkpoint=checkpoint,
            allow_changes=args.allow_changes,
        )
    except DataError as err:  # the data checks before the first step
        raise CLIError(str(err)) from None
    return _report(summary, tcfg)


def cmd_finetune(args: argparse.Namespace) -> int:
    """``semmim finetune {retrieval,vqa,caption}``."""
    from semmim.config import TrainConfig, from_preset
    from semmim.data import DataError
    from semmim.downstream.tasks import TaskConfig, init_model_config, make_task
    from semmim.train import open_run_data, train

    model_sets, train_sets = parse_sets(args.sets)
    explicit = train_overrides(args)
    explicit.update(train_sets)
    explicit.setdefault("out", f"runs/{args.task}")
    task_given = train_overrides(args, TaskConfig, "task_")
    checkpoint = None
    try:
        if args.resume:
            checkpoint, model_cfg, tcfg = _resume_configs(args, explicit, model_sets)
            state = checkpoint[0]
            if state.get("task", "pretrain") != args.task:
                raise CLIError(
                    f"--resume: {checkpoint[1]} is a {state.get('task', 'pretrain')!r} run, "
                    f"not {args.task!r}"
                )
            task = make_task(args.task, {**state["task_config"], **task_given})
        else:
            task = make_task(args.task, TaskConfig(**task_given))
            tcfg = TrainConfig().override(explicit)
            preset_cfg = from_preset(args.preset or "tiny", {} if task.cfg.init else model_sets)
            model_cfg = init_model_config(task.cfg, preset_cfg)
            if task.cfg.init and model_sets:
                model_cfg = model_cfg.override(model_sets)  # e.g. text.dropout=0.1
            if task.cfg.init and args.preset:
                logging.getLogger("semmim").warning(
                    "--preset ignored: the model config is the --ckpt checkpoint's"
                )
        source = open_run_data(tcfg, task)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    try:
        summary = train(
            model_cfg,
            tcfg,
            resume=args.resume,
            source=source,
            checkpoint=checkpoint,
            allow_changes=args.allow_changes,
            task=task,
        )
    except DataError as err:  # the data checks before the first step
        raise CLIError(str(err)) from None
    return _report(summary, tcfg)


def cmd_eval(args: argparse.Namespace) -> int:
    """``semmim eval``."""
    import torch

    from semmim import SemMIM
    from semmim.checkpoint import EVAL_KEYS, open_checkpoint
    from semmim.config import SemMIMConfig, TrainConfig
    from semmim.data import open_data
    from semmim.eval import evaluate, format_table

    try:
        state, path = open_checkpoint(args.ckpt, "cpu", EVAL_KEYS)
        tcfg = TrainConfig.from_dict(state["train_config"])
        model_cfg = SemMIMConfig.from_dict(state["config"])
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(f"--ckpt: {err}") from None
    saved_task = state.get("task", "pretrain")
    task_name = args.task or saved_task
    if task_name in ("vqa", "caption") or saved_task in ("vqa", "caption"):
        if task_name != saved_task:
            raise CLIError(
                f"--task {task_name}: {path} is a {saved_task!r} checkpoint (vqa and caption "
                "evaluate a checkpoint fine-tuned for that task)"
            )
        return _eval_task(args, state, path, tcfg, model_cfg)
    if args.beam_size is not None:
        raise CLIError(f"--beam-size: only for --task caption, not {task_name}")
    model = SemMIM(model_cfg)
    model.load_state_dict(state["model"])
    device = torch.device(
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    model.to(device)
    spec = args.data if args.data is not None else (tcfg.data or None)
    try:
        if task_name == "retrieval":
            from semmim.downstream.tasks import open_pairs

            source = open_pairs(spec or "", tcfg.val_size, tcfg.split_seed)
        else:
            source = open_data(spec, tcfg.val_size, tcfg.split_seed)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(f"--data: {err}") from None
    records = source.val if args.split == "val" else source.train + source.val
    print(
        f"checkpoint {path} (step {state['step']}); data {source.describe()}; "
        f"evaluating {args.split} split",
        flush=True,
    )
    result = evaluate(
        model,
        records,
        image_size=model_cfg.vision.image_size,
        max_len=min(tcfg.max_text_len, model_cfg.text.max_len),
        class_names=source.class_names,
        prompt_template=source.prompt_template,
        rerank_k=args.rerank_k,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
    )
    result.update(
        checkpoint=path,
        step=state["step"],
        data=spec or "synthetic",
        split=args.split,
        task=task_name,
        skipped_listing=source.skips.summary(),
    )
    table = format_table(result)
    print(table)
    json_path = args.json or os.path.join(os.path.dirname(os.path.dirname(path)), "eval.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.splitext(json_path)[0] + ".txt", "w") as f:
        f.write(table + "\n")
    print(f"wrote {json_path}")
    return 0


def _eval_task(args: argparse.Namespace, state: dict, path: str, tcfg, model_cfg) -> int:
    """``semmim eval`` of a vqa / caption checkpoint on its task's metrics."""
    import torch

    from semmim.downstream.tasks import make_task

    task_cfg = dict(state["task_config"])
    if args.beam_size is not None:
        task_cfg["beam_size"] = args.beam_size
    try:
        task = make_task(state["task"], task_cfg)
        run_cfg = tcfg.override(
            {
                "data": args.data if args.data is not None else tcfg.data,
                "num_workers": args.num_workers,
                "eval_batch_size": args.batch_size,
            }
        )
        source = task.open_data(run_cfg)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(f"--data: {err}") from None
    if args.split == "all":
        source.val = source.train + source.val
    device = torch.device(
        "cuda"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    model = task.build_model(model_cfg, pretrained=False)
    model.load_state_dict(state["model"])
    model.to(device)
    print(
        f"checkpoint {path} ({state['task']}, step {state['step']}); data {source.describe()}; "
        f"evaluating {args.split} split",
        flush=True,
    )
    json_path = args.json or os.path.join(os.path.dirname(os.path.dirname(path)), "eval.json")
    task.evaluate_model(
        model, source, model_cfg, run_cfg, device, os.path.dirname(json_path), json_path
    )
    print(f"wrote {json_path}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """``semmim ablate``."""
    from semmim.ablate import format_table, parse_variants, run_grid
    from semmim.config import TrainConfig

    model_sets, train_sets = parse_sets(args.sets)
    explicit = train_overrides(args)
    explicit.update(train_sets)
    for key, why in (
        ("seed", "use --seeds (one run per seed)"),
        ("stop_at", "each run is trained to the end; interrupt the grid and run it again"),
    ):
        if key in explicit:
            raise CLIError(f"--{key.replace('_', '-')} is not an ablate option: {why}")
    if explicit.get("eval_at_end") is False:
        raise CLIError("--no-eval is not an ablate option: the table is made of each run's eval")
    explicit.setdefault("out", "runs/ablate")
    try:
        variants = parse_variants(args.variants)
        if args.jobs > 1 and not explicit.get("threads"):
            explicit["threads"] = max(1, (os.cpu_count() or 1) // args.jobs)
        base = TrainConfig().override(explicit)
        report = run_grid(
            variants,
            args.seeds,
            args.preset,
            model_sets,
            base,
            command=" ".join(["semmim", *getattr(args, "argv", [])]),
            jobs=args.jobs,
        )
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise CLIError(str(err)) from None
    print(format_table(report))
    print(
        f"wrote {os.path.join(base.out, 'ablation.txt')} (.json, .csv, ablation_runs.csv, "
        f"ablation.png); {len(report['runs'])} of {len(report['runs']) + len(report['pending'])} "
        f"runs finished; this call took {report['seconds_this_call']:.0f} s"
    )
    return 130 if report["interrupted"] else 0


def cmd_data(args: argparse.Namespace) -> int:
    """``semmim data``."""
    from semmim.data import open_data

    try:
        source = open_data(args.spec, args.val_size)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    print(source.describe())
    if source.class_names:
        print(f"classes: {source.class_names}")
    for r in (source.train + source.val)[:3]:
        print(f"  {r.key}: {r.caption!r}")
    if args.check:
        decoded = source.check(progress=True)  # same decoder and skip reasons as training
        print(
            ", ".join(f"{split}: {ok} of {n} images decode" for split, (ok, n) in decoded.items())
        )
    print(f"skipped: {source.skips.summary()}")
    if args.check and decoded["train"][0] == 0:
        raise CLIError("no training image can be decoded")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``semmim`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by ablate
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging()
    handlers = {
        "train": cmd_train,
        "finetune": cmd_finetune,
        "eval": cmd_eval,
        "ablate": cmd_ablate,
        "data": cmd_data,
    }
    try:
        return handlers[args.command](args)
    except CLIError as err:
        print(f"semmim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semmim: interrupted", file=sys.stderr)
        return 130
