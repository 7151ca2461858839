"""``semmim ablate``: a grid of model variants × training seeds, evaluated on one held-out split.

    semmim ablate --preset tiny --data folder:/usr/share/tuxpaint/stamps --seeds 0 1 2 \\
        --steps 1500 --batch-size 32 --lr 1e-3 --threads 1 --set loss.mlm=0 --out runs/ablate

Each (variant, seed) run trains in ``OUT/<variant>/seed_<s>/`` with the ordinary training loop
(its own log, plots, checkpoints, ``eval.json``), then the grid writes ``OUT/ablation.{txt,json,csv}``
(mean ± std over seeds of each metric per variant, and each variant's difference from the reference
variant paired by seed), ``OUT/ablation_runs.csv`` (one row per run) and ``OUT/ablation.png`` (each
metric per variant, every seed a point).

- **One held-out split**: the data is opened once, with the grid's ``--split-seed``, and every run
  trains and is evaluated on that same split (recorded in the table). The training seed changes only
  the initialisation, data order, augmentation and per-step randomness.
- **Resume**: running the same command again skips finished runs (``summary.json`` says finished and
  ``eval.json`` exists), resumes an interrupted run from its newest checkpoint, and starts the rest.
  A run directory made with a different configuration is an error (use another ``--out``), never
  silently mixed into the table.
- **Order**: seed-major (every variant of seed 0, then of seed 1, ...), so an interrupted grid already
  has complete paired comparisons for its first seeds.
- **Validation** (``--validation X``, a TrainConfig field): every run trains on the training pairs
  minus X images carved out as a validation split and is evaluated there; the held-out pairs are
  not read. For choosing settings; report the chosen ones on the held-out split once.
- **Parallel** (``--jobs N``): N runs train at once, each in a child process started as
  ``python -P -m semmim.ablate --run RUN/ablate_run.json`` (plain JSON configs) with its output in
  ``RUN/ablate_run.log``; SIGINT/SIGTERM to the grid are forwarded as one SIGTERM per child, and
  a child receives SIGTERM from the kernel when the grid dies in any way, SIGKILL included
  (``PR_SET_PDEATHSIG``): it checkpoints and stops, never trains on as an orphan.
- **Owners**: the grid directory and each run directory are locked by the process writing them
  (:class:`semmim.rundir.RunLock`); a second grid into the same ``--out``, or a rerun while a run
  of an earlier grid still trains, is refused naming that process. A truncated ``summary.json`` /
  ``eval.json`` / ``config.json`` of a run is named in the error.

Variants (``--variants``): names of :data:`VARIANTS` (``default``, ``albef``, ``pixel``,
``random_mask``, ``no_text_target``, ``psi_text_cls``; comma-separated or separate words) or
definitions ``NAME=KEY=VALUE[,KEY=VALUE...]`` with the ``--set`` keys (model keys like
``mim.center_over=all``, run keys like ``train.lr=1e-4``); values are parsed as ``--set`` values
(true/false, numbers, else the string), never evaluated.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from semmim.ablate_report import METRICS, format_table, plot_grid, summarize

__all__ = [
    "VARIANTS",
    "DEFAULT_GRID",
    "METRICS",
    "Variant",
    "RunPlan",
    "parse_variants",
    "plan_grid",
    "run_state",
    "run_metrics",
    "summarize",
    "format_table",
    "run_grid",
]

log = logging.getLogger("semmim.ablate")

# The issue-13 grid: the paper's method and the ablations its claims rest on.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "albef": {"mim.enabled": False},
    "pixel": {"mim.target": "pixel"},
    "random_mask": {"masking.strategy": "random"},
    "no_text_target": {"mim.text_in_target": False},
    "psi_text_cls": {"mim.psi": "text_cls"},
}
DEFAULT_GRID = tuple(VARIANTS)


# Run options that do not change what a run computes: a finished run made with other values of
# these still counts as the same run.
_NOT_RESULT_KEYS = frozenset(
    {
        "out",
        "num_workers",
        "threads",
        "stop_at",
        "log_every",
        "diag_every",
        "ckpt_every",
        "keep_ckpts",
        "eval_batch_size",
    }
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Variant:
    """One grid row: a name (its directory) and the overrides it applies on top of the grid's."""

    name: str
    model: dict[str, Any] = field(default_factory=dict)  # dotted model keys
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields

    def describe(self) -> str:
        items = {**self.model, **{f"train.{k}": v for k, v in self.train.items()}}
        return ", ".join(f"{k}={_show(v)}" for k, v in items.items()) or "—"


def _show(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _split_keys(items: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model = {k: v for k, v in items.items() if not k.startswith("train.")}
    train = {k[len("train.") :]: v for k, v in items.items() if k.startswith("train.")}
    return model, train


def parse_variants(items: Sequence[str] | None) -> list[Variant]:
    """``--variants`` words → variants (default: :data:`DEFAULT_GRID`).

    A word is ``NAME=KEY=VALUE[,KEY=VALUE...]`` (a new variant) or a comma-separated list of
    names of :data:`VARIANTS`. Raises ValueError naming the bad word: an unknown name, a
    definition without ``KEY=VALUE`` items, a malformed item, a name that is not a plain
    directory name, a built-in name redefined, a name given twice.
    """
    from semmim.options import parse_value

    if not items:
        return [Variant(n, *_split_keys(VARIANTS[n])) for n in DEFAULT_GRID]
    out: list[Variant] = []
    for word in items:
        name, sep, rest = word.partition("=")
        name = name.strip()
        if sep:
            if not _NAME.match(name):
                raise ValueError(
                    f"--variants {word!r}: the name {name!r} must be letters, digits, '_', '.', "
                    "'-' (it names the run directory)"
                )
            if name in VARIANTS:
                raise ValueError(
                    f"--variants {word!r}: {name!r} is a built-in variant "
                    f"({VARIANTS[name] or 'no overrides'}); give the new one another name"
                )
            overrides: dict[str, Any] = {}
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key = key.strip()
                if not eq or not key or not value.strip():
                    raise ValueError(
                        f"--variants {word!r}: expected NAME=KEY=VALUE[,KEY=VALUE...], got the "
                        f"item {item!r} (e.g. centre_all=mim.center_over=all,mim.psi_norm=true)"
                    )
                if key in overrides:
                    raise ValueError(f"--variants {word!r}: {key} given twice")
                overrides[key] = parse_value(value.strip())
            out.append(Variant(name, *_split_keys(overrides)))
            continue
        names = [n.strip() for n in word.split(",")]
        for n in names:
            if n not in VARIANTS:
                raise ValueError(
                    f"--variants {word!r}: unknown variant {n!r}; built-in: "
                    f"{', '.join(VARIANTS)}; or define one as NAME=KEY=VALUE[,KEY=VALUE...]"
                )
            out.append(Variant(n, *_split_keys(VARIANTS[n])))
    seen: set[str] = set()
    for v in out:
        if v.name in seen:
            raise ValueError(f"--variants: {v.name!r} is given twice")
        seen.add(v.name)
    return out


@dataclass
class RunPlan:
    """One (variant, seed) run: its configs and directory."""

    variant: Variant
    seed: int
    model_cfg: Any
    tcfg: Any

    @property
    def out(self) -> str:
        return self.tcfg.out

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed {self.seed}"


def plan_grid(
    variants: Sequence[Variant],
    seeds: Sequence[int],
    preset: str,
    model_sets: dict[str, Any],
    base,
) -> list[RunPlan]:
    """Every run of the grid, seed-major; ``base`` is the grid's TrainConfig (its ``out`` the
    grid directory). Raises ValueError naming the variant whose overrides are invalid."""
    from semmim.config import from_preset

    if not seeds:
        raise ValueError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: a seed is given twice: {list(seeds)}")
    if any(s < 0 for s in seeds):
        raise ValueError(f"--seeds: seeds must be >= 0, got {list(seeds)}")
    configs = {}
    for v in variants:
        try:
            model_cfg = from_preset(preset, {**model_sets, **v.model})
            tcfg = base.override({**v.train, "eval_at_end": True, "stop_at": 0})
        except ValueError as err:
            raise ValueError(f"variant {v.name!r} ({v.describe()}): {err}") from None
        configs[v.name] = (model_cfg, tcfg)
    plans = []
    for seed in seeds:
        for v in variants:
            model_cfg, tcfg = configs[v.name]
            out = os.path.join(base.out, v.name, f"seed_{seed}")
            plans.append(RunPlan(v, seed, model_cfg, tcfg.override({"seed": seed, "out": out})))
    return plans


def _config_differences(plan: RunPlan) -> list[str]:
    """What differs between the run directory's config.json and the plan (empty when none or
    no config.json yet)."""
    saved = _read_json(os.path.join(plan.out, "config.json"))
    if saved is None:
        return []
    diffs = []
    want_model = plan.model_cfg.to_dict()
    got_model = saved.get("model", {})
    for section, fields_ in want_model.items():
        for k, v in fields_.items():
            g = got_model.get(section, {}).get(k, v)
            if g != v:
                diffs.append(f"{section}.{k}: {g!r} -> {v!r}")
    got_train = saved.get("train", {})
    for k, v in plan.tcfg.to_dict().items():
        if k in _NOT_RESULT_KEYS:
            continue
        g = got_train.get(k, v)
        if g != v:
            diffs.append(f"train.{k}: {g!r} -> {v!r}")
    return diffs


def run_state(plan: RunPlan) -> str:
    """ "done" (summary.json of a finished run and eval.json), "partial" (a checkpoint to resume
    from) or "new". Raises ValueError when the directory holds a run of another config."""
    diffs = _config_differences(plan)
    if diffs:
        raise ValueError(
            f"{plan.out} holds a run made with another configuration ({'; '.join(diffs[:6])}); "
            "the grid would mix it into the table. Use another --out, or delete that directory"
        )
    summary = _read_json(os.path.join(plan.out, "summary.json"))
    if (
        summary is not None
        and not summary.get("interrupted", True)
        and summary.get("step", -1) >= summary.get("total_steps", math.inf)
        and os.path.exists(os.path.join(plan.out, "eval.json"))
    ):
        return "done"
    from semmim.checkpoint import list_checkpoints

    if list_checkpoints(os.path.join(plan.out, "checkpoints")):  # step files or sharded steps
        return "partial"
    return "new"


def _read_json(path: str) -> dict[str, Any] | None:
    """A run file's JSON object, None when absent; RunDirError (a ValueError) naming a
    truncated or unparsable file (``runs/x/seed_0/summary.json: truncated JSON ...``)."""
    from semmim.rundir import RunDirError, read_json

    value = read_json(path, missing_ok=True)
    if value is not None and not isinstance(value, dict):
        raise RunDirError(f"{path}: holds a JSON {type(value).__name__}, not an object")
    return value


def run_metrics(run_dir: str) -> dict[str, float | None]:
    """A finished run's :data:`METRICS` from its eval.json and summary.json (None = not measured:
    no ITM re-rank, no zero-shot classes)."""
    ev = _read_json(os.path.join(run_dir, "eval.json")) or {}
    summary = _read_json(os.path.join(run_dir, "summary.json")) or {}
    itc, itm, zs = ev.get("itc", {}), ev.get("itm") or {}, ev.get("zero_shot") or {}
    return {
        "itc_mean_recall": itc.get("mean_recall"),
        "itm_mean_recall": itm.get("mean_recall"),
        "itc_i2t_r1": itc.get("i2t_r1"),
        "itc_t2i_r1": itc.get("t2i_r1"),
        "zero_shot_top1": zs.get("top1"),
        "train_s": summary.get("seconds"),
    }


def _write_outputs(report: dict[str, Any], out: str) -> None:
    """The grid's tables, each written atomically (a reader never sees half a table)."""
    from semmim.rundir import write_json, write_text

    s = report["summary"]
    write_json(os.path.join(out, "ablation.json"), _json_keys(report))
    write_text(os.path.join(out, "ablation.txt"), format_table(report) + "\n")
    keys = [k for k, _ in METRICS]
    table = io.StringIO()
    w = csv.writer(table)
    header = ["variant", "overrides"]
    for k in keys:
        header += [f"{k}_mean", f"{k}_std", f"{k}_n", f"{k}_paired_mean", f"{k}_paired_std"]
    w.writerow(header)
    for v in report["grid"]["variants"]:
        row = [v["name"], v["overrides"]]
        for k in keys:
            c = s["cells"][v["name"]][k]
            p = s["paired"].get(v["name"], {}).get(k, {})
            row += [c["mean"], c["std"], c["n"], p.get("mean"), p.get("std")]
        w.writerow(["" if x is None else x for x in row])
    write_text(os.path.join(out, "ablation.csv"), table.getvalue())
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["variant", "seed", "run_dir", *keys])
    for r in report["runs"]:
        vals = [r["metrics"].get(k) for k in keys]
        w.writerow([r["variant"], r["seed"], r["dir"], *["" if x is None else x for x in vals]])
    write_text(os.path.join(out, "ablation_runs.csv"), table.getvalue())
    plot_grid(report, os.path.join(out, "ablation.png"))


def _json_keys(obj: Any) -> Any:
    """JSON wants string keys (seeds are ints)."""
    if isinstance(obj, dict):
        return {str(k): _json_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_keys(v) for v in obj]
    return obj


# ------------------------------------------------------------------------- parallel runs
RUN_SPEC = "ablate_run.json"  # what a child process trains: plain JSON configs, nothing pickled
RUN_LOG = "ablate_run.log"  # the child's stdout and stderr (appended across resumes)


class _GridStop:
    """The grid's SIGINT/SIGTERM handler while child runs train (``--jobs`` > 1).

    Children run in their own sessions, so a terminal's Ctrl-C reaches only this process, which
    forwards one SIGTERM to each child (a child checkpoints and stops after its current step,
    exactly as ``semmim train`` does) and starts no further run. A second SIGINT kills the
    children without checkpoints and raises KeyboardInterrupt.
    """

    def __init__(self) -> None:
        import signal
        import threading

        self.requested = False
        self.children: list[Any] = []
        self._sigints = 0
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self, signum: int, frame: Any) -> None:
        import signal

        self._sigints += signum == signal.SIGINT
        if self._sigints > 1:
            for child in self.children:
                if child.poll() is None:
                    child.kill()
            raise KeyboardInterrupt("second SIGINT: runs killed without checkpoints")
        if not self.requested:
            self.requested = True
            log.warning("ablate: stop requested; each running run stops with a checkpoint")
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

    def restore(self) -> None:
        import signal

        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _start_child(plan: RunPlan, resume: bool):
    """Start ``python -P -m semmim.ablate --run SPEC`` for one plan, output to its RUN_LOG."""
    import subprocess

    from semmim.rundir import write_json

    spec_path = os.path.join(plan.out, RUN_SPEC)
    write_json(
        spec_path,
        {"model": plan.model_cfg.to_dict(), "train": plan.tcfg.to_dict(), "resume": resume},
        indent=1,
    )
    with open(os.path.join(plan.out, RUN_LOG), "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-P",
                "-m",
                "semmim.ablate",
                "--run",
                spec_path,
                "--parent",
                str(os.getpid()),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )


def _log_tail(plan: RunPlan, lines: int = 15) -> str:
    path = os.path.join(plan.out, RUN_LOG)
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_child(spec_path: str, parent: int | None = None) -> int:
    """A child run of a parallel grid: train the spec's configs (exit 0, or 130 if stopped;
    2 with the reason on stderr for a run directory or data that cannot be used).

    With ``parent`` (the grid's pid) the child dies with the grid: the kernel sends it SIGTERM
    when the grid dies, even by SIGKILL (:func:`semmim.rundir.die_with_parent`), so it
    checkpoints and stops instead of training on beside the grid's rerun.
    """
    from semmim.config import SemMIMConfig
    from semmim.data import DataError
    from semmim.run_config import TrainConfig
    from semmim.rundir import RunDirError, die_with_parent, read_json
    from semmim.train import open_run_data, train

    if parent is not None:
        die_with_parent(parent)
    try:
        spec = read_json(spec_path)
        model_cfg = SemMIMConfig.from_dict(spec["model"])
        tcfg = TrainConfig.from_dict(spec["train"])
        summary = train(model_cfg, tcfg, resume=bool(spec["resume"]), source=open_run_data(tcfg))
    except (RunDirError, DataError) as err:
        print(f"semmim ablate run: error: {err}", file=sys.stderr)
        return 2
    return 130 if summary["interrupted"] else 0


def run_grid(
    variants: Sequence[Variant],
    seeds: Sequence[int],
    preset: str,
    model_sets: dict[str, Any],
    base,
    command: str = "",
    progress: bool = True,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run (or resume) the grid and write its outputs under ``base.out``; returns the report.

    ``jobs`` > 1 trains that many runs at once, each in its own process (``python -P -m
    semmim.ablate --run``, its output in the run's ``ablate_run.log``; it dies with the grid);
    1 trains them one after another in this process. The grid directory is owned by this call
    (:class:`semmim.rundir.RunLock`): a second grid into it, or a rerun while a run of an
    earlier one still trains, is refused naming that process. ``report["interrupted"]`` is True when a run was stopped by
    SIGINT/SIGTERM (its checkpoint is written; the same call again resumes it); the outputs
    then hold the finished runs.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs: must be an integer >= 1, got {jobs!r}")
    from semmim.rundir import RunLock, prepare_out

    prepare_out(base.out, resume=True)  # not a file, writable, not in use (named)
    with RunLock(base.out, what="grid", command=command or None):
        return _run_grid(variants, seeds, preset, model_sets, base, command, progress, jobs)


def _run_grid(variants, seeds, preset, model_sets, base, command, progress, jobs):
    """:func:`run_grid` while this process owns the grid directory."""
    from tqdm.auto import tqdm

    from semmim.rundir import lock_owner
    from semmim.train import open_run_data, train

    started = time.perf_counter()
    plans = plan_grid(variants, seeds, preset, model_sets, base)
    states = {id(p): run_state(p) for p in plans}  # checks every directory before any work
    for plan in plans:
        owner = lock_owner(plan.out) if states[id(plan)] != "done" else None
        if owner is not None:  # e.g. a child of an earlier grid that is still training
            raise ValueError(
                f"{plan.out} ({plan.label}) is in use by another semmim process ({owner}); a "
                "second trainer would overwrite it. Stop that process (or let it end), then run "
                "the grid again"
            )
    source = open_run_data(base)
    log.info("ablate: data %s", source.describe())
    listing = source.listing()
    for plan in plans:  # a run trained on other pairs (its config.json says) must not join
        saved = (_read_json(os.path.join(plan.out, "config.json")) or {}).get("data_listing")
        if states[id(plan)] != "new" and saved is not None and listing not in (None, saved):
            raise ValueError(
                f"{plan.out} ({plan.label}) was trained on data that listed "
                f"{saved['train_pairs']} training and {saved['eval_pairs']} {saved['eval_split']} "
                f"pairs (digest {saved['digest'][:12]}); --data now lists "
                f"{listing['train_pairs']} and {listing['eval_pairs']} (digest "
                f"{listing['digest'][:12]}): {source.describe()}. The grid would mix the two "
                "into one table. Restore the data (e.g. install the missing decoder), or use "
                "another --out"
            )
    os.makedirs(base.out, exist_ok=True)
    reference = "default" if any(v.name == "default" for v in variants) else variants[0].name
    results: dict[tuple[str, int], dict[str, float | None]] = {}
    grid = {
        "preset": preset,
        "data": base.data or "synthetic",
        "steps": base.steps if base.steps else f"{base.epochs} epochs",
        "batch_size": base.batch_size,
        "seeds": list(seeds),
        "split_seed": base.split_seed,
        "eval_split": source.eval_split,
        "validation": base.validation,
        "heldout_pairs": len(source.val),
        "heldout_images": len({r.key for r in source.val}),
        "train_pairs": len(source.train),
        "sets": " ".join(f"{k}={_show(v)}" for k, v in model_sets.items()),
        "train_config": {k: v for k, v in base.to_dict().items() if k != "seed"},
        "variants": [
            {"name": v.name, "overrides": v.describe(), "model": v.model, "train": v.train}
            for v in variants
        ],
        "command": command,
        "jobs": jobs,
    }
    interrupted = False
    ran_s = 0.0

    def report(done_plans: list[RunPlan]) -> dict[str, Any]:
        runs = [
            {"variant": p.variant.name, "seed": p.seed, "dir": p.out, "metrics": results[key]}
            for p in plans
            if (key := (p.variant.name, p.seed)) in results
        ]
        pending = [
            {"variant": p.variant.name, "seed": p.seed}
            for p in plans
            if (p.variant.name, p.seed) not in results
        ]
        rep = {
            "grid": grid,
            "summary": summarize(results, [v.name for v in variants], seeds, reference),
            "runs": runs,
            "pending": pending,
            "interrupted": interrupted,
            "seconds_this_call": time.perf_counter() - started,
            "seconds_training_this_call": ran_s,
        }
        return rep

    bar = tqdm(
        total=len(plans), desc="ablate", disable=not progress, file=sys.stderr, dynamic_ncols=True
    )

    def finished(plan: RunPlan) -> None:
        results[(plan.variant.name, plan.seed)] = run_metrics(plan.out)
        if "ranking" not in grid:
            ev = _read_json(os.path.join(plan.out, "eval.json")) or {}
            grid["ranking"] = ev.get("ranking")
            grid["chance_mean_recall"] = (ev.get("chance") or {}).get("mean_recall")
            zs = ev.get("zero_shot") or {}
            grid["zero_shot_chance"] = zs.get("chance_top1")
            grid["zero_shot_majority"] = zs.get("majority_top1")
        bar.update(1)

    if jobs > 1:
        try:
            interrupted, ran_s = _run_parallel(plans, states, jobs, finished, report, base.out)
        finally:
            bar.close()
        rep = report(plans)
        _write_outputs(rep, base.out)
        return rep
    try:
        for i, plan in enumerate(plans):
            state = states[id(plan)]
            bar.set_postfix_str(plan.label, refresh=True)
            if state == "done":
                log.info("[%d/%d] %s: finished before, not redone", i + 1, len(plans), plan.label)
            else:
                log.info(
                    "[%d/%d] %s (%s): %s",
                    i + 1,
                    len(plans),
                    plan.label,
                    plan.variant.describe(),
                    "resuming from its checkpoint" if state == "partial" else "training",
                )
                t0 = time.perf_counter()
                summary = train(plan.model_cfg, plan.tcfg, resume=state == "partial", source=source)
                ran_s += time.perf_counter() - t0
                if summary["interrupted"]:
                    interrupted = True
                    break
            finished(plan)
            if state != "done":  # the table so far, after each run trained now
                _write_outputs(report(plans), base.out)
    finally:
        bar.close()
    rep = report(plans)
    _write_outputs(rep, base.out)
    return rep


def _run_parallel(plans, states, jobs, finished, report, out) -> tuple[bool, float]:
    """Train the grid's unfinished runs ``jobs`` at a time in child processes, in plan order;
    returns (interrupted, summed training seconds). A failed run stops the grid after the
    running ones end (RuntimeError with its log's tail); a stop request is forwarded."""
    for plan in plans:
        if states[id(plan)] == "done":
            log.info("%s: finished before, not redone", plan.label)
            finished(plan)
    queue = [p for p in plans if states[id(p)] != "done"]
    running: dict[Any, tuple[RunPlan, float]] = {}
    stop = _GridStop()
    failed: list[str] = []
    interrupted, ran_s = False, 0.0
    try:
        while queue or running:
            while queue and len(running) < jobs and not stop.requested and not failed:
                plan = queue.pop(0)
                resume = states[id(plan)] == "partial"
                child = _start_child(plan, resume)
                stop.children.append(child)
                running[child] = (plan, time.perf_counter())
                log.info(
                    "ablate: started %s (%s): %s, log %s",
                    plan.label,
                    plan.variant.describe(),
                    "resuming from its checkpoint" if resume else "training",
                    os.path.join(plan.out, RUN_LOG),
                )
            if not running:
                break
            time.sleep(0.5)
            for child in [c for c in running if c.poll() is not None]:
                plan, t0 = running.pop(child)
                ran_s += time.perf_counter() - t0
                rc = child.returncode
                if rc == 0 and run_state(plan) == "done":
                    finished(plan)
                    log.info("ablate: %s finished", plan.label)
                    _write_outputs(report(plans), out)
                elif rc == 130 or stop.requested:
                    interrupted = True
                    log.warning(
                        "ablate: %s stopped with a checkpoint (resume: same command)", plan.label
                    )
                else:
                    failed.append(
                        f"{plan.label} failed (exit status {rc}); the end of "
                        f"{os.path.join(plan.out, RUN_LOG)}:\n{_log_tail(plan)}"
                    )
            if stop.requested:
                interrupted = True
    finally:
        stop.restore()
    if failed:
        raise RuntimeError("; ".join(failed))
    return interrupted, ran_s


if __name__ == "__main__":  # a child run of a parallel grid (run_grid with jobs > 1)
    import argparse

    _parser = argparse.ArgumentParser(prog="python -m semmim.ablate")
    _parser.add_argument("--run", required=True, metavar="SPEC", help="ablate_run.json of a run")
    _parser.add_argument("--parent", type=int, default=None, help="the grid's pid (die with it)")
    _args = _parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(run_child(_args.run, _args.parent))
