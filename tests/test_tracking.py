"""``semmim train --report-to tensorboard,wandb``: what TensorBoard's own reader and W&B's offline
run hold after a tiny run and its resume (semmim.train.tracking)."""

from __future__ import annotations

import csv
import glob
import importlib.util
import os

import pytest

from semmim.cli import main
from semmim.run_config import TrainConfig, parse_reporters
from semmim.train import tracking


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


def _argv(out, *extra):
    return [
        "train",
        "--preset",
        "tiny",
        "--data",
        "synthetic:16:8",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--threads",
        "1",
        "--no-eval",
        "--log-every",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def _csv(run):
    with open(os.path.join(run, "log.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        os.path.join(run, "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def test_reporters_are_validated_by_name():
    assert parse_reporters("tensorboard, wandb,tensorboard") == ("tensorboard", "wandb")
    assert parse_reporters("") == ()
    with pytest.raises(ValueError, match="train.report_to: unknown reporter 'tensorbord'"):
        TrainConfig(report_to="tensorbord")


def test_unknown_reporter_and_missing_extra_are_clear_cli_errors(tmp_path, capsys, monkeypatch):
    assert main(_argv(tmp_path / "a", "--steps", "1", "--report-to", "mlflow")) == 2
    err = capsys.readouterr().err
    assert "unknown reporter 'mlflow'" in err and "tensorboard, wandb" in err
    assert "Traceback" not in err
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert main(_argv(tmp_path / "b", "--steps", "1", "--report-to", "wandb")) == 2
    err = capsys.readouterr().err
    assert "pip install 'semmim[wandb]'" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "b" / "config.json")  # refused before anything ran


def test_only_rank_0_reports():
    from types import SimpleNamespace

    other_rank = SimpleNamespace(
        tcfg=TrainConfig(report_to="tensorboard,wandb"),
        info=SimpleNamespace(is_main=False, world_size=2),
    )
    assert tracking.open_tracker(other_rank) is None


def test_wandb_mode_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the user's choice wins
    assert tracking.wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40)
    os.chmod(tmp_path / ".netrc", 0o600)
    assert tracking.wandb_mode() == "online"


@pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="tensorboard is not installed (pip install 'semmim[tensorboard]')",
)
def test_tensorboard_events_parse_with_the_csv_scalars_and_resume_continues(tmp_path, capsys):
    """TensorBoard's EventAccumulator reads every log.csv column as train/<column> at its
    steps, the plots as images, the configs as hyper-parameters; a resume from an older
    checkpoint purges the steps it repeats, so each step is there once with the CSV's value."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = str(tmp_path / "run")
    common = ["--report-to", "tensorboard", "--ckpt-every", "2", "--lr", "0.002"]
    assert main(_argv(run, "--steps", "4", *common)) == 0
    # Lose the last checkpoint: the resume starts at step 2 and logs steps 3 and 4 again.
    ckpts = os.path.join(run, "checkpoints")
    for name in ("step_00000004.pt", "step_00000004.pt.json"):
        os.unlink(os.path.join(ckpts, name))
    with open(os.path.join(ckpts, "latest"), "w") as f:
        f.write("step_00000002.pt\n")
    assert main(_argv(run, "--resume", *common)) == 0
    capsys.readouterr()

    rows = _csv(run)
    acc = _events(run)
    tags = acc.Tags()
    # the columns this run filled (e.g. diag_cov_* stay empty on data without alpha, and so
    # have no TensorBoard tag: nothing was measured)
    columns = [c for c in rows[0] if c != "step" and any(r[c] not in ("", None) for r in rows)]
    assert any(c.startswith("diag_") for c in columns)  # the diagnostics are in the log
    assert sorted(tags["scalars"]) == sorted(f"train/{c}" for c in columns)
    for c in columns:
        events = acc.Scalars(f"train/{c}")
        assert [e.step for e in events] == [1, 2, 3, 4], c
        for e, row in zip(events, rows):
            assert e.value == pytest.approx(float(row[c]), rel=1e-6, abs=1e-12), (c, e.step)
    assert {"plots/loss", "plots/diagnostics"} <= set(tags["images"])
    assert [e.step for e in acc.Images("plots/loss")][-1] == 4
    assert "config/text_summary" in tags["tensors"]
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["train.lr"].number_value == pytest.approx(0.002)
    assert hp["model.vision.dim"].number_value == 64  # the tiny preset
    assert hp["train.report_to"].string_value == "tensorboard"


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None,
    reason="wandb is not installed (pip install 'semmim[wandb]')",
)
def test_wandb_offline_run_is_written_and_resumed_with_the_same_id(tmp_path, capsys, monkeypatch):
    """In offline mode (no network), the run goes to OUT/wandb/offline-run-*-<id>/ with the
    scalars, plots and eval numbers; a resume uses the id stored in OUT/wandb_run_id."""
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = str(tmp_path / "run")
    argv = [a for a in _argv(run, "--report-to", "wandb") if a != "--no-eval"]
    assert main([*argv, "--steps", "3", "--stop-at", "2", "--eval-rerank-k", "2"]) == 0
    run_id = open(os.path.join(run, tracking.WANDB_ID_FILE)).read().strip()
    assert len(glob.glob(os.path.join(run, "wandb", f"offline-run-*-{run_id}"))) == 1
    assert main([*argv, "--resume"]) == 0  # to step 3, then the held-out evaluation
    capsys.readouterr()
    runs = glob.glob(os.path.join(run, "wandb", f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # the resumed session: same id (wandb sync merges them)
    data = b"".join(open(p, "rb").read() for d in runs for p in glob.glob(f"{d}/run-*.wandb"))
    # the history records name what log.csv holds (W&B's binary format, read as bytes)
    for key in (b"train/loss", b"train/diag_mim_entropy", b"train/lr", b"train/step"):
        assert key in data, key
    assert b"plots/loss" in data and b"eval/" in data
    images = glob.glob(os.path.join(run, "wandb", "*", "files", "media", "images", "plots", "*"))
    assert images, "the plots were not logged as images"


def test_wandb_online_start_that_fails_continues_offline(tmp_path, monkeypatch, caplog):
    """An API key but no network: the online start fails (W&B raises after its init timeout),
    the run goes on offline; the run id is stored once and reused by the next session."""
    import sys
    from types import ModuleType, SimpleNamespace

    calls = []

    def init(mode, **kw):
        calls.append((mode, kw["id"], kw["resume"], kw["dir"]))
        if mode == "online":
            raise TimeoutError("init timed out after 60 s")
        return SimpleNamespace(
            dir=str(tmp_path), define_metric=lambda *a, **k: None, log=lambda *a, **k: None
        )

    fake = ModuleType("wandb")
    fake.init, fake.Settings = init, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking, "check_available", lambda names: None)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    out = str(tmp_path)
    with caplog.at_level("WARNING", logger="semmim.train"):
        tracking.Tracker(("wandb",), out, {"train": {"lr": 1.0}})
    assert [c[0] for c in calls] == ["online", "offline"]
    assert "online start failed" in caplog.text and "init timed out" in caplog.text
    run_id = open(os.path.join(out, tracking.WANDB_ID_FILE)).read().strip()
    assert calls[0][1:] == (run_id, "allow", out)
    tracking.Tracker(("wandb",), out, {"train": {"lr": 1.0}}, resume_step=3)
    assert calls[-1][1] == run_id  # the resumed session is the same run
