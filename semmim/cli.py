"""The ``semmim`` command line (also ``python -m semmim``): ``train``, ``finetune``, ``eval``,
``ablate``, ``data``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from typing import Any

from semmim.options import (
    DATA_HELP,
    TASK_DATA_HELP,
    CLIError,
    add_run_options,
    add_train_options,
    model_keys_help,
    parse_sets,
    train_overrides,
)

DEFAULT_PRESET = "small"

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


def _add_data_and_split(parser: argparse.ArgumentParser, data_help: str) -> None:
    """``--data SPEC`` and ``--split {val,all}`` of the commands that read a checkpoint's data."""
    parser.add_argument("--data", metavar="SPEC", default=None, help=data_help + DATA_HELP)
    parser.add_argument(
        "--split",
        choices=["val", "all"],
        default="val",
        help="val = the held-out split made as in training (default); all = every pair",
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
    sub = parser.add_subparsers(dest="command", required=True)  # usage lists every command

    tr = sub.add_parser(
        "train",
        help="pre-train (or resume); evaluates the held-out split at the end",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG + "\n" + model_keys_help(),
        description=textwrap.fill(
            "Pre-train SemMIM. Writes OUT/log.csv (every logged step), OUT/loss.png, "
            "OUT/checkpoints/ (atomic, checksummed; 'latest' pointer), OUT/eval.json + eval.txt "
            "(held-out retrieval at the end) and OUT/summary.json. Ctrl-C / SIGTERM finish the "
            "current step, write a checkpoint and exit with status 130. Under torchrun it runs "
            "DDP (NCCL on GPUs, gloo on CPU).",
            96,
        )
        + "\n\n"
        + textwrap.fill("data specs (--data SPEC): " + DATA_HELP, 96),
    )
    add_run_options(tr, DEFAULT_PRESET)

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
        + textwrap.fill("data specs (--data SPEC): " + TASK_DATA_HELP + ". " + DATA_HELP, 96),
    )
    ft.add_argument("task", choices=["retrieval", "vqa", "caption"], help="the downstream task")
    from semmim.run_config import TaskConfig

    add_train_options(ft, TaskConfig, "task_")
    add_run_options(ft, "tiny", scratch_only=True)

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
    _add_data_and_split(ev, "data to evaluate (default: the run's training data spec). ")
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
        help="where to write the results (its folder is created; checked before evaluating). "
        "Default: beside the run the checkpoint belongs to (RUN for RUN/checkpoints/step_*.pt, "
        "else the checkpoint's folder): RUN/eval.json for the run's own evaluation (its data, "
        "the val split, its task, its newest checkpoint); otherwise RUN/eval_<what differs>.json, "
        "e.g. eval_folder-tux_all_step100.json, so the run's held-out result is never replaced "
        "by another evaluation. The table goes to the same name with .txt",
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
        + textwrap.fill("data specs (--data SPEC): " + DATA_HELP, 96),
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

    pr = sub.add_parser(
        "probe",
        help="diagnostics of a pre-training checkpoint: what the MIM targets rest on, gradient "
        "norms per objective, mask vs object coverage",
        description="Probe a pre-training checkpoint on held-out images: the student's MIM "
        "agreement with the teacher's codes with the real image, a blank image and another "
        "caption; how often another caption flips the teacher's code; each objective's gradient "
        "norm on the image and text encoders; and, for images with an alpha channel, the "
        "text-guided mask's overlap with the most object-covered patches (docs/METHOD.md).",
    )
    pr.add_argument(
        "ckpt",
        metavar="CHECKPOINT",
        help="run directory, checkpoints directory, or a step_*.pt file",
    )
    _add_data_and_split(pr, "data to probe (default: the run's). ")
    pr.add_argument("--batch-size", type=int, default=32, help="pairs per batch (>= 2; default 32)")
    pr.add_argument("--max-pairs", type=int, default=0, help="probe at most N pairs (0 = all)")
    pr.add_argument("--num-workers", type=int, default=0, help="image loading workers (default 0)")
    pr.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    pr.add_argument("--json", metavar="FILE", default=None, help="also write the means as JSON")

    da = sub.add_parser(
        "data",
        help="open a data spec, report counts and skipped samples",
        description="List a --data spec: pairs, images, classes, held-out split "
        "and skipped samples; --check decodes every image.",
    )
    da.add_argument("spec", nargs="?", default=None, metavar="SPEC", help=DATA_HELP)
    da.add_argument("--check", action="store_true", help="decode every image and count failures")
    da.add_argument("--val-size", type=float, default=0.1, help="held-out fraction or count")
    _add_export_parser(sub)
    return parser


def _add_export_parser(sub) -> None:
    """``semmim export RUN --format hf DIR`` (:mod:`semmim.export`)."""
    ex = sub.add_parser(
        "export",
        help="write a run's weights as a folder others can load (safetensors + config.json + "
        "tokenizer + model card)",
        description=textwrap.fill(
            "Export the newest checkpoint of RUN (run dir, checkpoints dir or step_*.pt) in the "
            "Hugging Face layout: DIR/model.safetensors (the trained towers and the ITC "
            "temperature; --ema: the momentum towers instead), DIR/config.json, the tokenizer "
            "files and DIR/README.md (a model card). Load it with "
            "semmim.SemMIM.from_pretrained(DIR). The EMA copy, queues and centres are training "
            "state and stay in the checkpoint.",
            96,
        ),
    )
    ex.add_argument("run", metavar="RUN", help="run directory, checkpoints dir or step_*.pt")
    ex.add_argument("dir", metavar="DIR", help="output folder (new or empty)")
    ex.add_argument("--format", choices=["hf"], default="hf", help="hf: Hugging Face layout")
    ex.add_argument(
        "--ema", action="store_true", help="export the momentum (EMA) towers as the weights"
    )
    ex.add_argument(
        "--overwrite",
        action="store_true",
        help="DIR is not empty: replace the export's files in it (others are left alone)",
    )


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s" if rank == 0 else f"[rank {rank}] %(message)s",
    )


def _resume_point(
    args: argparse.Namespace, changes: dict[str, Any], model_sets: dict[str, Any], task: str
):
    """``--resume``: :func:`semmim.train.resume.resume_point` of OUT (refused before any data is
    opened when it breaks the resume contract)."""
    from semmim.run_config import TrainConfig
    from semmim.train.resume import resume_point

    try:
        return resume_point(
            changes.get("out", TrainConfig.out),
            int(os.environ.get("WORLD_SIZE", "1")),
            args.allow_changes,
            task,
            changes=changes,
            model_sets=model_sets,
            preset_given=args.preset or False,
        )
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None


def _prepare_out(args: argparse.Namespace, out: str, command: str) -> None:
    """``--out`` before anything is opened: not a file, writable, not in use by another process,
    and (without --resume) not holding a run unless --overwrite moves it aside
    (:func:`semmim.rundir.prepare_out`)."""
    from semmim.rundir import RunDirError, prepare_out

    try:
        moved = prepare_out(out, args.resume, args.overwrite, command)
    except (RunDirError, OSError) as err:
        raise CLIError(str(err)) from None
    if moved:
        logging.getLogger("semmim").warning(
            "--overwrite: moved the old run in %s to %s", out, moved
        )


def _run_options(args: argparse.Namespace, **defaults: Any) -> tuple[dict, dict]:
    """(model ``--set`` overrides, run options given: the TrainConfig options and ``train.``
    keys over ``defaults``)."""
    model_sets, train_sets = parse_sets(args.sets)
    return model_sets, {**defaults, **train_overrides(args), **train_sets}


def _train(args: argparse.Namespace, model_cfg, tcfg, checkpoint, task=None) -> int:
    """Open the run's data, train, report (exit status 0, or 130 when interrupted)."""
    from semmim.albef import InitError, check_init
    from semmim.data import DataError
    from semmim.rundir import RunDirError
    from semmim.train import open_run_data, train
    from semmim.train.tracking import TrackingError, check_available, parse_reporters

    try:
        if not args.resume:  # --report-to extras, the --init file: before the data is listed
            check_init(tcfg.init, task.name if task is not None else "pretrain")
        check_available(parse_reporters(tcfg.report_to))
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
    # data checks, the run dir's owner, a full disk, --report-to / --init problems
    except (DataError, RunDirError, TrackingError, InitError) as err:
        raise CLIError(str(err)) from None
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
    from semmim.config import from_preset
    from semmim.run_config import TrainConfig

    model_sets, given = _run_options(args)
    _prepare_out(args, given.get("out", TrainConfig.out), "semmim train")
    if args.resume:
        point = _resume_point(args, given, model_sets, "pretrain")
        return _train(args, point.model_cfg, point.tcfg, point)
    try:
        model_cfg = from_preset(args.preset or DEFAULT_PRESET, model_sets)
        tcfg = TrainConfig().override(given)
    except ValueError as err:
        raise CLIError(str(err)) from None
    return _train(args, model_cfg, tcfg, None)


def cmd_finetune(args: argparse.Namespace) -> int:
    """``semmim finetune {retrieval,vqa,caption}``."""
    from semmim.config import from_preset
    from semmim.downstream.tasks import init_model_config, make_task
    from semmim.run_config import TaskConfig, TrainConfig

    model_sets, given = _run_options(args, out=f"runs/{args.task}")
    _prepare_out(args, given["out"], f"semmim finetune {args.task}")
    task_given = train_overrides(args, TaskConfig, "task_")
    if args.resume:
        point = _resume_point(args, given, model_sets, args.task)
        try:
            task = make_task(args.task, {**point.state["task_config"], **task_given})
        except ValueError as err:
            raise CLIError(str(err)) from None
        return _train(args, point.model_cfg, point.tcfg, point, task)
    try:
        task = make_task(args.task, TaskConfig(**task_given))
        tcfg = TrainConfig().override(given)
        preset_cfg = from_preset(args.preset or "tiny")
        model_cfg = init_model_config(task.cfg, preset_cfg, model_sets, bool(args.preset))
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    return _train(args, model_cfg, tcfg, None, task)


def cmd_eval(args: argparse.Namespace) -> int:
    """``semmim eval``: :func:`semmim.eval_checkpoint.open_checkpoint_eval`, then its one
    evaluation path."""
    from semmim.eval_checkpoint import open_checkpoint_eval

    try:
        job = open_checkpoint_eval(
            args.ckpt,
            task=args.task,
            data=args.data,
            split=args.split,
            rerank_k=args.rerank_k,
            beam_size=args.beam_size,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
        )
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    from semmim.rundir import RunDirError, check_output_file

    json_path = args.json or job.json_path
    try:  # before the evaluation runs, not after
        check_output_file(json_path, "--json" if args.json else "eval result")
    except RunDirError as err:
        raise CLIError(str(err)) from None
    print(job.describe(), flush=True)
    if os.path.exists(json_path):
        print(f"{json_path} exists and will be replaced by this evaluation", flush=True)
    job.run(json_path)
    print(f"wrote {json_path}")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    """``semmim probe``: :func:`semmim.probe.probe_checkpoint`, printed."""
    from semmim.probe import format_probe, probe_checkpoint
    from semmim.rundir import RunDirError, check_output_file, write_json

    try:
        if args.json:
            check_output_file(args.json, "--json")
        result = probe_checkpoint(
            args.ckpt,
            data=args.data,
            split=args.split,
            batch_size=args.batch_size,
            max_pairs=args.max_pairs,
            num_workers=args.num_workers,
            device=args.device,
        )
    except (ValueError, FileNotFoundError, RunDirError) as err:
        raise CLIError(str(err)) from None
    print(format_probe(result))
    if args.json:
        write_json(args.json, {"pairs": result.pairs, "chance": result.chance, **result.means})
        print(f"wrote {args.json}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """``semmim ablate``."""
    from semmim.ablate import format_table, parse_variants, run_grid
    from semmim.run_config import TrainConfig

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


def cmd_export(args: argparse.Namespace) -> int:
    """``semmim export``."""
    from semmim.export import export_hf

    try:
        meta = export_hf(args.run, args.dir, ema=args.ema, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    src = meta["source"]
    print(
        f"exported {'the momentum (EMA)' if args.ema else 'the trained'} weights of "
        f"{src['checkpoint']} (step {src['step']}) to {args.dir}; load with "
        f"SemMIM.from_pretrained({args.dir!r})"
    )
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
        "probe": cmd_probe,
        "data": cmd_data,
        "export": cmd_export,
    }
    try:
        return handlers[args.command](args)
    except CLIError as err:
        print(f"semmim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk while writing a run file: say so, no traceback
        from semmim.rundir import no_space_error

        full = no_space_error(err)
        if full is None:
            raise
        print(f"semmim {args.command}: error: {full}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semmim: interrupted", file=sys.stderr)
        return 130
