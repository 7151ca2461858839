"""``semmim ablate``'s statistics, table and plot: per-variant mean ± std over seeds, each
variant's difference from the reference paired by seed, the markdown table and the grid plot
(the grid itself, its runs and their resume are in :mod:`semmim.ablate`)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

# (key, column title): per-run values read from eval.json / summary.json.
METRICS: tuple[tuple[str, str], ...] = (
    ("itc_mean_recall", "ITC mean R"),
    ("itm_mean_recall", "ITM mean R"),
    ("itc_i2t_r1", "ITC i2t R@1"),
    ("itc_t2i_r1", "ITC t2i R@1"),
    ("zero_shot_top1", "zero-shot top-1"),
    ("train_s", "train time (s)"),
)


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
    n = len(values)
    return {
        "mean": statistics.fmean(values) if n else None,
        "std": statistics.stdev(values) if n > 1 else None,  # sample std (n − 1)
        "n": n,
    }


def summarize(
    results: dict[tuple[str, int], dict[str, float | None]],
    variants: Sequence[str],
    seeds: Sequence[int],
    reference: str,
) -> dict[str, Any]:
    """Cells and paired differences from per-run metrics ``{(variant, seed): metrics}``.

    ``cells[v][m]``: mean, sample std (None for one seed), n and the per-seed values of metric
    ``m`` over the finished runs of variant ``v``. ``paired[v][m]``: the same statistics of
    ``m(v, s) − m(reference, s)`` over the seeds where both runs finished (absent for the
    reference itself).
    """
    cells: dict[str, dict[str, Any]] = {}
    paired: dict[str, dict[str, Any]] = {}
    for v in variants:
        cells[v] = {}
        if v != reference:
            paired[v] = {}
        for key, _ in METRICS:
            values = {
                s: results[(v, s)][key]
                for s in seeds
                if (v, s) in results and results[(v, s)].get(key) is not None
            }
            cells[v][key] = {**_mean_std(list(values.values())), "values": values}
            if v == reference:
                continue
            if key == "train_s":
                continue  # a time difference per seed says nothing the cells do not
            diffs = {
                s: x - results[(reference, s)][key]
                for s, x in values.items()
                if (reference, s) in results and results[(reference, s)].get(key) is not None
            }
            paired[v][key] = {**_mean_std(list(diffs.values())), "diffs": diffs}
    return {"reference": reference, "cells": cells, "paired": paired}


def _cell(stat: dict[str, Any], signed: bool = False, digits: int = 1) -> str:
    if not stat or stat["n"] == 0:
        return "—"
    mean = f"{stat['mean']:+.{digits}f}" if signed else f"{stat['mean']:.{digits}f}"
    std = "n/a" if stat["std"] is None else f"{stat['std']:.{digits}f}"
    return f"{mean} ± {std}"


def _split_name(grid: dict[str, Any]) -> str:
    """What the grid evaluated on: the held-out split, or the validation split it carved."""
    if grid.get("eval_split") == "validation":
        return (
            f"validation split (--validation {grid['validation']:g}, carved from the training data)"
        )
    return "held-out"


def format_table(report: dict[str, Any]) -> str:
    """The grid's report as markdown text: header, cells (mean ± std over seeds), paired
    differences vs the reference, and every run's values."""
    g, s = report["grid"], report["summary"]
    metrics = [(k, t) for k, t in METRICS if any(s["cells"][v][k]["n"] for v in s["cells"])]
    digits = {"train_s": 0}
    lines = [
        f"ablation grid: preset {g['preset']}, data {g['data']}, {g['steps']} steps × batch "
        f"{g['batch_size']}, seeds {' '.join(map(str, g['seeds']))}; "
        f"{_split_name(g)} {g['heldout_pairs']} pairs ({g['heldout_images']} images), split seed {g['split_seed']} "
        f"(the same for every run); ranking {g.get('ranking', '?')}; chance ITC mean R "
        f"{_fmt(g.get('chance_mean_recall'))}"
        + (
            f"; zero-shot top-1 by chance {_fmt(g['zero_shot_chance'])}, by always naming the "
            f"majority class {_fmt(g['zero_shot_majority'])}"
            if g.get("zero_shot_majority") is not None
            else ""
        ),
        f"grid --set: {g['sets'] or '—'}"
        + (f"; {g['jobs']} runs trained at once" if g.get("jobs", 1) > 1 else ""),
    ]
    if not report["runs"]:
        pending = ", ".join(f"{r['variant']} seed {r['seed']}" for r in report["pending"])
        return "\n".join([*lines, "", f"no run finished yet; pending: {pending}"])
    rows = []
    for v in g["variants"]:
        cells = s["cells"][v["name"]]
        n = max(c["n"] for c in cells.values())
        row = [_cell(cells[k], digits=digits.get(k, 1)) for k, _ in metrics]
        rows.append([v["name"], v["overrides"], str(n), *row])
    lines += _markdown_table(
        "mean ± std over seeds (sample std; n/a with one seed; n = finished runs):",
        ["variant", "overrides", "n", *(t for _, t in metrics)],
        rows,
    )
    paired = [(k, t) for k, t in metrics if k != "train_s"]
    if s["paired"]:
        ref = s["reference"]
        rows = []
        for v in g["variants"]:
            if v["name"] == ref:
                continue
            p = s["paired"][v["name"]]
            n = max(c["n"] for c in p.values())
            row = [_cell(p.get(k, {}), signed=True, digits=digits.get(k, 1)) for k, _ in paired]
            rows.append([v["name"], str(n), *row])
        lines += _markdown_table(
            f"paired by seed: variant − {ref} on the same seed, mean ± std over seeds:",
            ["variant", "seeds", *(f"Δ {t}" for _, t in paired)],
            rows,
        )
    rows = [
        [
            r["variant"],
            str(r["seed"]),
            *(_fmt(r["metrics"].get(k), digits.get(k, 1)) for k, _ in metrics),
        ]
        for r in report["runs"]
    ]
    lines += _markdown_table("every run:", ["variant", "seed", *(t for _, t in metrics)], rows)
    missing = [f"{r['variant']} seed {r['seed']}" for r in report["pending"]]
    if missing:
        lines += ["", f"not finished ({len(missing)}): {', '.join(missing)}"]
    return "\n".join(lines)


def _markdown_table(title: str, head: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a titled markdown table (a blank line before and after the title)."""
    lines = ["", title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def plot_grid(report: dict[str, Any], png_path: str) -> None:
    """One panel per retrieval / zero-shot metric: every seed a point per variant, the mean a
    bar with ± std; the chance level as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, g = report["summary"], report["grid"]
    names = [v["name"] for v in g["variants"]]
    keys = [
        (k, t) for k, t in METRICS if k != "train_s" and any(s["cells"][n][k]["n"] for n in names)
    ]
    if not keys:
        return
    seeds = g["seeds"]
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(
        1, len(keys), figsize=(max(4.0, 0.9 * len(names) + 1.5) * len(keys), 4.2), squeeze=False
    )
    for ax, (key, title) in zip(axes[0], keys):
        labelled: set[int] = set()  # each seed named once in the legend
        for x, n in enumerate(names):
            c = s["cells"][n][key]
            for j, seed in enumerate(seeds):
                if seed in c["values"]:
                    dx = (j - (len(seeds) - 1) / 2) * 0.08
                    ax.scatter(
                        x + dx,
                        c["values"][seed],
                        color=colours(j % 10),
                        s=22,
                        zorder=3,
                        label=f"seed {seed}" if seed not in labelled else None,
                    )
                    labelled.add(seed)
            if c["n"]:
                ax.errorbar(
                    x + 0.3, c["mean"], yerr=c["std"] or 0.0, fmt="_", color="black",
                    markersize=14, capsize=3, zorder=2,
                )  # fmt: skip
        if key == "itc_mean_recall" and g.get("chance_mean_recall") is not None:
            ax.axhline(g["chance_mean_recall"], color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"{g['preset']} on {g['data']}: {g['steps']} steps, seeds {' '.join(map(str, seeds))}, "
        f"split seed {g['split_seed']}, {g.get('eval_split', 'held-out')} split (bar: mean ± std)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
