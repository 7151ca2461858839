"""The semmim CLI: help, clear errors for bad input, a tiny train -> eval -> resume round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from semmim.cli import main, parse_sets, parse_value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_help_lists_commands_and_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "eval", "data", "torchrun"):
        assert word in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--preset",
        "--data",
        "--steps",
        "--epochs",
        "--batch-size",
        "--out",
        "--resume",
        "--set",
        "folder:PATH",
        "json:FILE",
        "csv:FILE",
        "wds:PATTERN",
        "synthetic",
    ):
        assert flag in out, flag
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    for flag in ("--ckpt", "--data", "--rerank-k", "ITM", "zero-shot"):
        assert flag in out, flag


def test_python_dash_m_works():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "semmim", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0 and "usage: semmim" in proc.stdout


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--set", "vision.nope=3"], "vision.nope"),
        (["train", "--set", "nosection=3"], "nosection"),
        (["train", "--set", "train.nope=3"], "train.nope"),
        (["train", "--set", "mim.target=voxels"], "target"),
        (["train", "--set", "novalue"], "key=value"),
        (["train", "--data", "zip:/x"], "zip"),
        (["train", "--batch-size", "0"], "batch_size"),
    ],
)
def test_bad_input_is_a_clear_error_not_a_traceback(argv, needle, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and needle in err and "Traceback" not in err


def test_missing_checkpoint_errors(tmp_path, capsys):
    assert main(["eval", "--ckpt", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "--resume" in capsys.readouterr().err


def test_steps_and_epochs_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--steps", "1", "--epochs", "1"])
    assert exc.value.code == 2


def test_parse_values_and_sets():
    assert parse_value("true") is True and parse_value("3") == 3 and parse_value("1e-4") == 1e-4
    assert parse_value("pixel") == "pixel"
    assert parse_sets(["a.b=1", "train.lr=0.1"]) == ({"a.b": 1}, {"lr": 0.1})


def test_train_eval_resume_round_trip(tmp_path, capsys):
    run = str(tmp_path / "run")
    common = [
        "--data",
        "synthetic:16:8",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--out",
        run,
        "--threads",
        "1",
    ]
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--steps",
                "2",
                "--set",
                "train.eval_rerank_k=2",
                "mim.target=pixel",
                *common,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ranking" in out and "trained 2/2 steps" in out
    assert main(["eval", "--ckpt", run, "--rerank-k", "3", "--num-workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "ITC, then ITM re-rank of the top 3" in out
    result = json.load(open(os.path.join(run, "eval.json")))
    assert result["n_images"] == 8 and result["itm"]["mean_recall"] >= 0
    assert main(["train", "--resume", "--steps", "3", *common]) == 0
    assert "trained 3/3 steps" in capsys.readouterr().out
    cfg = json.load(open(os.path.join(run, "config.json")))
    assert cfg["model"]["mim"]["target"] == "pixel"  # the checkpoint's model config is kept
