"""The semmim CLI: help, clear errors for bad input, a tiny train -> eval -> resume round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from semmim.cli import build_parser, main
from semmim.options import parse_sets, parse_value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


def test_help_lists_commands_and_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "eval", "data", "torchrun"):
        assert word in out
    # The usage line names every subcommand the parser accepts (it once missed `probe`).
    usage = out.split("\n")[0]
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == {"train", "finetune", "eval", "ablate", "probe", "data", "export"}
    for name in sub.choices:
        assert name in usage, (name, usage)
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
    # -P: the installed package (the source folder has no _C and no semmim.kernels)
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "semmim", "--help"],
        capture_output=True,
        text=True,
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


@pytest.mark.parametrize("flag", [["--steps", "0"], ["--epochs", "0"], ["--steps", "-3"]])
def test_zero_or_negative_length_is_exit_2_before_loading_data(flag, tmp_path, capsys):
    # The data spec does not exist: the length error must come first, without a traceback.
    argv = ["train", *flag, "--data", "folder:/nonexistent/x", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and "Traceback" not in err and "nonexistent" not in err


def test_every_train_config_field_is_an_option_and_documented(capsys):
    import dataclasses

    from semmim.run_config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    with open(os.path.join(ROOT, "docs", "TRAINING.md")) as f:
        docs = f.read()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        assert flag in help_text, flag
        assert f"`{flag}`" in docs and f"`train.{f.name}`" in docs, f"docs/TRAINING.md: {flag}"


def test_every_model_config_key_is_listed_in_train_help(capsys):
    """Every ``--set`` key of the model config (each field of each section dataclass) is in
    ``semmim train --help`` with its type and default."""
    import dataclasses

    from semmim.config import SemMIMConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    n = 0
    for section in dataclasses.fields(SemMIMConfig):
        for f in dataclasses.fields(section.default_factory):
            assert f"  {section.name}.{f.name}: " in help_text, f"{section.name}.{f.name}"
            n += 1
    assert n > 50
    assert "  mim.target: semantic|pixel = semantic" in help_text
    assert "  vision.depth: int = 12" in help_text


HELP_BOUND_S = 3.0  # generous: about 0.4 s on a 2-core machine once no torch is imported


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_is_fast_and_imports_no_torch(argv):
    """``semmim --help`` builds the parser from the config dataclasses only: no torch, no model."""
    code = (
        "import sys, time; t = time.perf_counter()\n"
        "from semmim.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print(f'{time.perf_counter() - t:.3f}', 'torch' in sys.modules, file=sys.stderr)"
    )
    import time

    t0 = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-P", "-c", code, *argv], capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - t0
    in_process, torch_imported = run.stderr.split()[-2:]
    assert "usage: semmim" in run.stdout
    assert torch_imported == "False", "building the parser imported torch"
    assert wall < HELP_BOUND_S, (
        f"semmim {' '.join(argv)} took {wall:.2f} s (in-process {in_process} s)"
    )


def test_options_set_the_train_config_fields():
    from semmim.cli import build_parser
    from semmim.options import train_overrides

    args = build_parser().parse_args(
        ["train", "--batch-size", "8", "--no-eval", "--amp", "bf16", "--compile", "--epochs", "2"]
    )
    assert train_overrides(args) == {
        "batch_size": 8,
        "eval_at_end": False,
        "amp": "bf16",
        "compile": True,
        "epochs": 2.0,
    }


def test_resume_contract(tmp_path, capsys, monkeypatch):
    run = str(tmp_path / "run")
    common = ["--num-workers", "0", "--out", run, "--threads", "1", "--no-eval"]
    small = ["--set", "vision.image_size=32", "loss.mlm=0", "itc.queue_size=16"]
    first = ["train", "--preset", "tiny", "--data", "synthetic:16:4", "--batch-size", "4"]
    assert main([*first, "--steps", "3", "--stop-at", "1", *common, *small]) == 0
    assert "trained 1/3 steps" in capsys.readouterr().out
    refused = [
        (["--batch-size", "2"], "batch_size: 4 -> 2"),
        (["--seed", "5"], "seed: 0 -> 5"),
        (["--data", "synthetic:20:4"], "data: 'synthetic:16:4' -> 'synthetic:20:4'"),
        (["--accum-steps", "2"], "accum_steps: 1 -> 2"),
        (["--set", "train.val_size=0.2"], "val_size"),
    ]
    for extra, needle in refused:
        assert main(["train", "--resume", *common, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and "--allow-changes" in err and "Traceback" not in err, err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--resume", *common]) == 2
    assert "world_size: 1 -> 2" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    # A misspelled model key is an error on resume too (a valid one is ignored with a warning).
    assert main(["train", "--resume", *common, "--set", "vision.nope=3"]) == 2
    assert "vision.nope" in capsys.readouterr().err
    # The saved stop_at=1 does not carry over: the resume runs to the end.
    assert main(["train", "--resume", *common]) == 0
    assert "trained 3/3 steps" in capsys.readouterr().out
    # An explicit, allowed change continues (and says so in the log).
    assert (
        main(["train", "--resume", *common, "--steps", "4", "--seed", "1", "--allow-changes"]) == 0
    )
    assert "trained 4/4 steps" in capsys.readouterr().out


def test_resume_refuses_data_that_lists_other_pairs(tmp_path, capsys):
    """The same --data spec can list other pairs later (an optional decoder missing, a file
    removed, a caption edited): --resume refuses by what changed, naming what it lists now;
    --allow-changes continues. Once happened: a grid resumed on a machine without cairosvg
    trained its second half on 609 instead of 760 Tux Paint pairs, silently."""
    from PIL import Image

    folder = tmp_path / "pics"
    folder.mkdir()
    for i in range(12):
        Image.new("RGB", (24, 24), (20 * i, 100, 200 - 10 * i)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"picture number {i}\n")
    run = str(tmp_path / "run")
    common = ["--num-workers", "0", "--out", run, "--threads", "1", "--no-eval"]
    small = ["--set", "vision.image_size=32", "loss.mlm=0", "itc.queue_size=16"]
    first = ["train", "--preset", "tiny", "--data", f"folder:{folder}", "--batch-size", "4"]
    assert main([*first, "--steps", "3", "--stop-at", "1", *common, *small]) == 0
    capsys.readouterr()
    (folder / "p3.txt").write_text("an edited caption\n")  # same counts, other pairs
    assert main(["train", "--resume", *common]) == 2
    err = capsys.readouterr().err
    assert "same number of pairs, but other ones" in err and "--allow-changes" in err, err
    (folder / "p3.txt").write_text("picture number 3\n")  # restored: resumes again ...
    (folder / "p5.png").unlink()  # ... until an image goes
    assert main(["train", "--resume", *common]) == 2
    err = capsys.readouterr().err
    assert "now lists 10 training and 1 held-out pairs; the run trained on 11" in err, err
    assert f"folder:{folder}: 10 train pairs" in err and "Traceback" not in err, err
    assert main(["train", "--resume", *common, "--allow-changes"]) == 0
    assert "trained 3/3 steps" in capsys.readouterr().out


def test_train_compile_does_not_recompile_per_step(tmp_path, monkeypatch, capsys):
    """``semmim train --set train.compile=true`` for 12 steps while the MIM teacher temperature
    warms up over the whole run: the first step runs eagerly, the second compiles, the third
    once more (the seed turns into a dynamic int), then no step compiles again. torch.compile
    runs here with a counting ``aot_eager`` backend (Inductor's C++ build takes minutes on
    CPU; the graphs Dynamo captures, and so its guards, are the same); each captured graph
    records the model's training progress (= its step) when it was compiled. (Captions of
    varying length recompile once, then run with a dynamic length; a diagnostic step compiles
    its own variant once.)"""
    import torch

    compiled_at: list[float] = []
    real_compile = torch.compile

    def counting_compile(module, **kwargs):
        def backend(gm, example_inputs):
            compiled_at.append(module.progress)
            return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

        return real_compile(module, backend=backend)

    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    argv = ["train", "--preset", "tiny", "--steps", "12", "--data", "synthetic:16:8"]
    argv += ["--batch-size", "4", "--num-workers", "0", "--threads", "1"]
    # captions truncated to one length and no diagnostic step: the batches' shapes and the
    # step's kind stay the same, so only a schedule could cause a recompile
    argv += ["--max-text-len", "8", "--out", str(tmp_path / "run"), "--set", "train.compile=true"]
    argv += ["train.diag_every=100"]
    argv += ["vision.depth=1", "text.depth=1", "fusion.depth=1", "mim.teacher_temp_warmup=1.0"]
    assert main(argv) == 0
    assert "trained 12/12 steps" in capsys.readouterr().out
    steps = sorted(set(compiled_at))
    assert len(steps) == 2, f"graphs compiled at progress {compiled_at} (steps of 12 = x * 12)"
