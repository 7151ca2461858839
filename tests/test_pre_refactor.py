"""The code after issue 20's model split computes what main 3f5c839 computed, bit for bit.

``tests/data/pre_refactor/`` holds what the old code produced (see ``record.py`` there and
``resume.json``'s ``made_by``): the losses, diagnostics and buffer sums of a few forward/backward
steps of the tiny model in several configurations, and a small pre-training checkpoint (step 4 of
6) with the losses of the two steps its resume ran.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from semmim import SemMIMConfig, build_model
from semmim.checkpoint import read_checkpoint

DATA = Path(__file__).parent / "data" / "pre_refactor"


def _recorder():
    spec = importlib.util.spec_from_file_location("pre_refactor_record", DATA / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as record.py: a float sum's order must not depend on threads
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", list(json.loads((DATA / "forward.json").read_text())))
def test_forward_steps_match_the_old_code(name, one_thread, monkeypatch):
    old = json.loads((DATA / "forward.json").read_text())[name]
    record = _recorder()
    # record.py builds with the old constructor SemMIM(cfg); the factory is today's equivalent
    monkeypatch.setattr(record, "SemMIM", build_model)
    new = record.record(old["overrides"])
    for part in ("step1", "step2", "state", "eval"):
        assert new[part] == old[part], f"{name} {part}: {new[part]} != {old[part]}"
    # diagnostics added since (issue 17's diag_mim_agree_blank, ...) are new columns; every
    # diagnostic the old code computed keeps its value bit for bit
    missing = sorted(set(old["diag"]) - set(new["diag"]))
    assert not missing, f"{name} diag: the old diagnostics {missing} are gone"
    kept = {k: new["diag"][k] for k in old["diag"]}
    assert kept == old["diag"], f"{name} diag: {kept} != {old['diag']}"


def _checkpoint_dir(tmp_path: Path) -> Path:
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    with (
        lzma.open(DATA / "step_00000004.pt.xz") as src,
        open(ckpts / "step_00000004.pt", "wb") as f,
    ):
        shutil.copyfileobj(src, f)
    shutil.copy(DATA / "step_00000004.pt.json", ckpts)
    (ckpts / "latest").write_text("step_00000004.pt")
    return ckpts


def test_old_checkpoint_loads_with_every_key_shape_and_value(tmp_path):
    path = _checkpoint_dir(tmp_path) / "step_00000004.pt"
    state = read_checkpoint(str(path), "cpu")
    model = build_model(SemMIMConfig.from_dict(state["config"]), pretrained=False)
    ours = model.state_dict()
    assert list(ours) == list(state["model"])
    for k, v in state["model"].items():
        assert ours[k].shape == v.shape and ours[k].dtype == v.dtype, k
    model.load_state_dict(state["model"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k


@pytest.mark.slow
def test_old_checkpoint_resumes_bit_exactly(tmp_path):
    """Resume the old code's step-4 checkpoint for steps 5 and 6 (CLI, one thread): the logged
    losses, learning rates and diagnostics equal those of the old code's resume, and so do the
    sums of every tensor of the step-6 model."""
    old = json.loads((DATA / "resume.json").read_text())
    ckpts = _checkpoint_dir(tmp_path)
    run = ckpts.parent
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-P", "-m", "semmim", "train", "--resume", "--steps", "6"]
    cmd += ["--num-workers", "0", "--no-eval", "--threads", "1", "--out", str(run)]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    with open(run / "log.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) > 4]
    assert [{k: r[k] for k in want} for r, want in zip(rows, old["resumed_rows"])] == old[
        "resumed_rows"
    ]
    state = read_checkpoint(str(ckpts / "step_00000006.pt"), "cpu")
    sums = {k: float(v.double().sum()).hex() for k, v in state["model"].items()}
    assert sums == old["step6_model_sums"]
