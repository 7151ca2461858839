"""``semmim probe``: the diagnostics of a trained checkpoint on held-out images."""

from __future__ import annotations

import json

import pytest
from run_helpers import small_run
from test_diagnostics import SMALL, _stamp

from semmim import from_preset
from semmim.cli import main
from semmim.diagnostics import COVERAGE_COLUMNS, RELIANCE_COLUMNS
from semmim.train import train


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


@pytest.fixture(scope="module")
def stamp_run(tmp_path_factory):
    """A 2-step run on 12 RGBA stamps (4 held out), its checkpoint written at the end."""
    root = tmp_path_factory.mktemp("probe")
    folder = root / "stamps"
    folder.mkdir()
    for i in range(12):
        _stamp(folder / f"s{i}.png", 48, left=i % 2 == 0)
        (folder / f"s{i}.txt").write_text(
            f"a red block on the {'left' if i % 2 == 0 else 'right'} {i}\n"
        )
    out = root / "run"
    train(from_preset("tiny", SMALL), small_run(out, data=f"folder:{folder}", steps=2, val_size=4))
    return out, folder


def test_probe_prints_every_diagnostic_and_writes_json(stamp_run, capsys, tmp_path):
    out, _ = stamp_run
    target = tmp_path / "probe.json"
    assert main(["probe", str(out), "--batch-size", "2", "--json", str(target)]) == 0
    printed = capsys.readouterr().out
    assert "4 pairs probed" in printed and "M/P" in printed
    assert "image encoder" in printed
    result = json.loads(target.read_text())
    assert result["pairs"] == 4 and result["chance"] == 0.5
    for col in (*RELIANCE_COLUMNS, *COVERAGE_COLUMNS, "diag_grad_itc_vision", "diag_mim_agree"):
        assert col in result, col
    assert 0 <= result["diag_mim_agree_blank"] <= 1
    assert result["diag_grad_glob_text"] == 0 and result["diag_grad_itc_text"] > 0


def test_probe_is_repeatable_and_leaves_the_checkpoint_alone(stamp_run, tmp_path):
    out, _ = stamp_run
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (out / "checkpoints").iterdir())
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["probe", str(out), "--batch-size", "2", "--json", str(a)]) == 0
    assert main(["probe", str(out), "--batch-size", "2", "--json", str(b)]) == 0
    assert json.loads(a.read_text()) == json.loads(b.read_text())
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (out / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "1"], "--batch-size: must be >= 2"),
        (["--max-pairs", "-1"], "--max-pairs"),
        (["--max-pairs", "1"], "at least 2"),
        (["--data", "folder:/nonexistent/stamps"], "--data"),
    ],
)
def test_probe_errors_name_the_option(stamp_run, capsys, args, message):
    out, _ = stamp_run
    assert main(["probe", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_probe_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nope")]) == 2
    assert "--ckpt" in capsys.readouterr().err
