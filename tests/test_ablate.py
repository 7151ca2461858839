"""``semmim ablate``: variant parsing, the statistics, a tiny 2 × 2 grid end to end and its resume."""

from __future__ import annotations

import json
import os
import statistics

import pytest

from semmim.ablate import VARIANTS, parse_variants, plan_grid, summarize
from semmim.cli import main
from semmim.run_config import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


def test_parse_variants_names_lists_and_definitions():
    assert [v.name for v in parse_variants(None)] == list(VARIANTS)
    assert len(VARIANTS) == 6 and VARIANTS["albef"] == {"mim.enabled": False}
    vs = parse_variants(["default,albef", "pixel", "c=mim.center_over=all,train.lr=1e-4,x.y=3"])
    assert [v.name for v in vs] == ["default", "albef", "pixel", "c"]
    assert vs[1].model == {"mim.enabled": False} and vs[0].model == {}
    assert vs[3].model == {"mim.center_over": "all", "x.y": 3} and vs[3].train == {"lr": 1e-4}
    assert parse_variants(["t=mim.psi_norm=true"])[0].model == {"mim.psi_norm": True}


@pytest.mark.parametrize(
    "words,needle",
    [
        (["nonsense"], "unknown variant 'nonsense'"),
        (["default,"], "unknown variant ''"),
        (["x=mim.target"], "NAME=KEY=VALUE"),
        (["x="], "NAME=KEY=VALUE"),
        (["x=mim.target=pixel,"], "NAME=KEY=VALUE"),
        (["../up=mim.target=pixel"], "name"),
        (["albef=mim.target=pixel"], "built-in"),
        (["default", "default"], "given twice"),
        (["x=mim.psi=text_cls,mim.psi=cross_attention"], "given twice"),
    ],
)
def test_bad_variant_specs_are_clear_errors(words, needle):
    with pytest.raises(ValueError, match="--variants") as exc:
        parse_variants(words)
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--variants", "x=mim.target"], "NAME=KEY=VALUE"),
        (["--variants", "nope"], "unknown variant"),
        (["--variants", "bad=mim.nope=1"], "variant 'bad'"),
        (["--variants", "bad=mim.target=voxels"], "target"),
        (["--seed", "3"], "--seeds"),
        (["--seeds", "1", "1"], "twice"),
        (["--stop-at", "2"], "stop-at"),
        (["--no-eval"], "--no-eval"),
    ],
)
def test_cli_bad_specs_exit_2_before_any_training(argv, needle, tmp_path, capsys):
    assert main(["ablate", "--data", "synthetic:8:4", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert "semmim ablate: error" in err and needle in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "ablation.json")


def test_summarize_mean_std_and_paired_differences():
    metrics = ("itc_mean_recall", "itm_mean_recall", "zero_shot_top1")
    vals = {
        ("default", 0): (10.0, 1.0, None),
        ("default", 1): (20.0, 2.0, None),
        ("default", 2): (30.0, 4.0, None),
        ("pixel", 0): (12.0, 1.5, None),
        ("pixel", 1): (18.0, 2.5, None),
        ("pixel", 2): (36.0, 3.0, None),
        ("albef", 1): (25.0, 2.0, None),  # one seed only
    }
    results = {k: dict(zip(metrics, v)) for k, v in vals.items()}
    s = summarize(results, ["default", "pixel", "albef"], [0, 1, 2], "default")
    c = s["cells"]["default"]["itc_mean_recall"]
    assert c["mean"] == 20.0 and c["std"] == pytest.approx(10.0) and c["n"] == 3
    assert s["cells"]["pixel"]["itc_mean_recall"]["std"] == pytest.approx(
        statistics.stdev([12.0, 18.0, 36.0])
    )
    p = s["paired"]["pixel"]["itc_mean_recall"]  # diffs 2, -2, 6
    assert p["diffs"] == {0: 2.0, 1: -2.0, 2: 6.0}
    assert p["mean"] == pytest.approx(2.0) and p["std"] == pytest.approx(4.0)
    a = s["cells"]["albef"]["itc_mean_recall"]
    assert a["n"] == 1 and a["std"] is None and a["mean"] == 25.0
    assert s["paired"]["albef"]["itc_mean_recall"]["diffs"] == {1: 5.0}
    assert s["cells"]["default"]["zero_shot_top1"]["n"] == 0  # not measured: not a zero
    assert "default" not in s["paired"]


ARGS = [
    "--variants",
    "default,albef",
    "--seeds",
    "0",
    "1",
    "--data",
    "synthetic:12:6",
    "--steps",
    "2",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
    "--threads",
    "1",
    "--eval-rerank-k",
    "2",
    "--split-seed",
    "3",
    "--set",
    "vision.image_size=32",
    "loss.mlm=0",
    "itc.queue_size=16",
]


def test_grid_table_equals_the_runs_and_resume_skips_finished_runs(tmp_path, capsys, caplog):
    import logging

    out = tmp_path / "grid"
    # An interrupted run before the grid starts: default seed 1 stopped after step 1.
    from semmim.train import train

    plans = plan_grid(
        parse_variants(["default,albef"]),
        [0, 1],
        "tiny",
        {"vision.image_size": 32, "loss.mlm": 0, "itc.queue_size": 16},
        TrainConfig(
            data="synthetic:12:6",
            steps=2,
            batch_size=4,
            num_workers=0,
            threads=1,
            eval_rerank_k=2,
            split_seed=3,
            out=str(out),
        ),
    )
    assert [(p.variant.name, p.seed) for p in plans] == [
        ("default", 0),
        ("albef", 0),
        ("default", 1),
        ("albef", 1),
    ]
    partial = plans[2]
    train(partial.model_cfg, partial.tcfg.override({"stop_at": 1}))
    assert not os.path.exists(os.path.join(partial.out, "eval.json"))

    with caplog.at_level(logging.INFO, logger="semmim"):
        assert main(["ablate", *ARGS, "--out", str(out)]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("default seed 1" in m and "resuming from its checkpoint" in m for m in messages)
    assert sum("training" in m and m.startswith("[") for m in messages) == 3
    printed = capsys.readouterr().out
    report = json.load(open(out / "ablation.json"))
    for name in ("ablation.txt", "ablation.csv", "ablation_runs.csv", "ablation.png"):
        assert os.path.exists(out / name), name
    assert report["grid"]["split_seed"] == 3 and report["grid"]["heldout_pairs"] == 6
    assert "split seed 3" in (out / "ablation.txt").read_text()
    assert "majority class" in (out / "ablation.txt").read_text()  # the zero-shot baselines
    assert len(report["runs"]) == 4 and report["pending"] == []

    # The table's numbers are the runs' eval.json values; one held-out split for all.
    by_run = {}
    for p in plans:
        ev = json.load(open(os.path.join(p.out, "eval.json")))
        summary = json.load(open(os.path.join(p.out, "summary.json")))
        assert ev["n_images"] == 6 and summary["heldout_pairs"] == 6 and summary["step"] == 2
        by_run[(p.variant.name, p.seed)] = {
            "itc_mean_recall": ev["itc"]["mean_recall"],
            "itm_mean_recall": ev["itm"]["mean_recall"],
            "itc_i2t_r1": ev["itc"]["i2t_r1"],
            "itc_t2i_r1": ev["itc"]["t2i_r1"],
            "zero_shot_top1": ev["zero_shot"]["top1"],
            "train_s": summary["seconds"],
        }
    assert {(r["variant"], r["seed"]): r["metrics"] for r in report["runs"]} == by_run
    cells, paired = report["summary"]["cells"], report["summary"]["paired"]
    for v in ("default", "albef"):
        for key in ("itc_mean_recall", "itm_mean_recall", "zero_shot_top1"):
            xs = [by_run[(v, s)][key] for s in (0, 1)]
            assert cells[v][key]["mean"] == pytest.approx(statistics.fmean(xs))
            assert cells[v][key]["std"] == pytest.approx(statistics.stdev(xs))
    d = [
        by_run[("albef", s)]["itc_mean_recall"] - by_run[("default", s)]["itc_mean_recall"]
        for s in (0, 1)
    ]
    assert paired["albef"]["itc_mean_recall"]["mean"] == pytest.approx(statistics.fmean(d))
    assert paired["albef"]["itc_mean_recall"]["std"] == pytest.approx(statistics.stdev(d))
    m, sd = cells["albef"]["itc_mean_recall"]["mean"], cells["albef"]["itc_mean_recall"]["std"]
    assert f"{m:.1f} ± {sd:.1f}" in printed and "paired by seed" in printed
    # The resumed run's log reads as one run: the row its --stop-at 1 wrote between two log
    # steps is replaced by the final row, which averages steps 1 and 2 (the window of step 1
    # came back from the checkpoint).
    with open(os.path.join(partial.out, "log.csv")) as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["2"]

    # Again: every run is finished, nothing is retrained (eval.json and checkpoints untouched).
    watched = [os.path.join(p.out, "eval.json") for p in plans]
    watched += [os.path.join(p.out, "checkpoints", "latest") for p in plans]
    before = {w: os.stat(w).st_mtime_ns for w in watched}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="semmim"):
        assert main(["ablate", *ARGS, "--out", str(out)]) == 0
    assert {w: os.stat(w).st_mtime_ns for w in watched} == before
    messages = [r.getMessage() for r in caplog.records]
    assert sum("not redone" in m for m in messages) == 4
    assert not any("training" in m and m.startswith("[") for m in messages)
    assert json.load(open(out / "ablation.json"))["summary"] == report["summary"]

    # A different configuration in the same directory is refused, not mixed into the table.
    assert main(["ablate", *ARGS, "--out", str(out), "--lr", "1e-2"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_parallel_grid_equals_the_sequential_grid(tmp_path):
    """--jobs 2 trains each run in its own process (python -P -m semmim.ablate --run): same
    runs, same numbers as one after another in this process; the runs' logs are in their dirs."""
    seq, par = tmp_path / "seq", tmp_path / "par"
    args = [*ARGS, "--variants", "default,albef", "--seeds", "0"]
    assert main(["ablate", *args, "--out", str(seq)]) == 0
    assert main(["ablate", *args, "--jobs", "2", "--out", str(par)]) == 0
    a = json.load(open(seq / "ablation.json"))
    b = json.load(open(par / "ablation.json"))
    assert b["grid"]["jobs"] == 2 and len(b["runs"]) == 2 and b["pending"] == []
    drop = ("train_s",)
    for ra, rb in zip(a["runs"], b["runs"]):
        assert (ra["variant"], ra["seed"]) == (rb["variant"], rb["seed"])
        assert {k: v for k, v in ra["metrics"].items() if k not in drop} == {
            k: v for k, v in rb["metrics"].items() if k not in drop
        }
        assert os.path.exists(os.path.join(rb["dir"], "ablate_run.log"))
    assert "2 runs trained at once" in (par / "ablation.txt").read_text()


def test_jobs_must_be_positive(tmp_path, capsys):
    assert main(["ablate", *ARGS, "--jobs", "0", "--out", str(tmp_path / "g")]) == 2
    assert "--jobs" in capsys.readouterr().err


def test_parallel_grid_stops_with_checkpoints_and_resumes(tmp_path):
    """SIGTERM to a --jobs 2 grid: it forwards one SIGTERM to each running run, each stops
    after its step with a checkpoint, the grid exits 130; the same command resumes them (their
    logs continue, not restart) and finishes the table."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "grid"
    args = list(ARGS)
    args[args.index("--steps") + 1] = "60"
    args[args.index("--set") : args.index("--set")] = ["--log-every", "1"]
    cmd = [sys.executable, "-P", "-m", "semmim", "ablate", *args, "--seeds", "0", "--jobs", "2"]
    cmd += ["--out", str(out)]
    grid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    logs = [out / v / "seed_0" / "log.csv" for v in ("default", "albef")]
    deadline = time.time() + 300
    while time.time() < deadline and not all(
        p.exists() and len(p.read_text().splitlines()) > 2 for p in logs
    ):
        time.sleep(0.2)
    grid.send_signal(signal.SIGTERM)
    _, err = grid.communicate(timeout=300)
    assert grid.returncode == 130, err.decode()[-2000:]
    stopped = [p.parent for p in logs if not (p.parent / "eval.json").exists()]
    assert stopped, "no run was still training when the grid was stopped"
    for run in stopped:
        assert list((run / "checkpoints").glob("step_*.pt")), run
    done = subprocess.run(cmd, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    report = json.load(open(out / "ablation.json"))
    assert len(report["runs"]) == 2 and report["pending"] == []
    for run in stopped:
        steps = [line.split(",")[0] for line in (run / "log.csv").read_text().splitlines()[1:]]
        assert steps == [str(s) for s in range(1, 61)], steps  # continued where it stopped


def test_table_header_names_the_split_it_evaluated():
    from semmim.ablate_report import _split_name

    assert _split_name({"eval_split": "held-out"}) == "held-out"
    assert _split_name({}) == "held-out"  # grids written before the validation split existed
    text = _split_name({"eval_split": "validation", "validation": 95.0})
    assert "validation split (--validation 95, carved from the training data)" == text


def test_grid_refuses_runs_trained_on_data_that_listed_other_pairs(tmp_path, capsys):
    """A finished run whose config.json records another data listing (here: an image removed
    since; in practice a decoder missing on another machine) is refused by name, not mixed
    into the table with runs of the data as it is now."""
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (24, 24), (20 * i, 100, 200 - 10 * i)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"picture number {i}\n")
    out = tmp_path / "grid"
    argv = ["ablate", "--variants", "default", "--seeds", "0", "--data", f"folder:{folder}"]
    argv += ["--steps", "1", "--batch-size", "4", "--val-size", "3", "--out", str(out)]
    argv += ["--set", "vision.image_size=32", "loss.mlm=0", "itc.queue_size=16"]
    argv += ["train.num_workers=0", "train.eval_rerank_k=2"]
    assert main(argv) == 0
    saved = json.load(open(out / "default" / "seed_0" / "config.json"))["data_listing"]
    assert saved["train_pairs"] + saved["eval_pairs"] == 10
    capsys.readouterr()
    assert main(argv) == 0  # same data: the finished run is kept
    (folder / "p4.png").unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "default seed 0" in err and "was trained on data that listed" in err, err
    assert "would mix the two" in err and "Traceback" not in err, err
