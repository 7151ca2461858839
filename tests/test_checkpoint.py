"""Atomic checkpoints: round trip, pruning, resolution, RNG capture, and SIGKILL mid-write."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from semmim.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    list_checkpoints,
    load_checkpoint,
    load_latest_intact,
    open_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_atomic_save_round_trip_leaves_no_temp(tmp_path):
    path = tmp_path / "x.pt"
    atomic_torch_save({"a": torch.arange(5)}, str(path))
    assert torch.equal(torch.load(path)["a"], torch.arange(5))
    assert os.listdir(tmp_path) == ["x.pt"]


def test_save_prunes_points_latest_and_resolves(tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        save_checkpoint({"step": step}, str(ckpt_dir), step, keep=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(ckpt_dir))] == [
        "step_00000020.pt",
        "step_00000030.pt",
    ]
    assert (ckpt_dir / "latest").read_text().strip() == "step_00000030.pt"
    for where in (tmp_path / "run", ckpt_dir, ckpt_dir / "step_00000020.pt"):
        assert load_checkpoint(str(where))["step"] in (20, 30)
    assert load_checkpoint(str(tmp_path / "run"))["step"] == 30
    (ckpt_dir / "latest").unlink()  # no pointer: newest file
    assert resolve_checkpoint(str(tmp_path / "run")).endswith("step_00000030.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_checkpoint(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint({}, str(ckpt_dir), 40, keep=0)


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = rng_state({"g": gen})
    first = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=gen))
    set_rng_state(state, {"g": gen})
    second = (random.random(), np.random.rand(), torch.rand(3), torch.rand(2, generator=gen))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])


WRITER = textwrap.dedent(
    """
    import io, sys, time, torch
    import semmim.checkpoint as ckpt

    real_save = torch.save

    def slow_save(obj, f):
        # Write half the bytes, pause, write the rest: the temp file sits half-written a while.
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.4)
        f.write(data[len(data) // 2 :])

    ckpt.torch.save = slow_save
    step = 0
    while True:
        step += 1
        state = {"step": step, "data": torch.full((1 << 18,), float(step)),
                 "tail": torch.full((1 << 18,), float(step))}
        ckpt.save_checkpoint(state, sys.argv[1], step, keep=2)
    """
)


def test_sigkill_during_checkpoint_write_keeps_previous_loadable(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for _ in range(2):
        # -P: the installed package (the source folder has no _C and no semmim.kernels)
        proc = subprocess.Popen([sys.executable, "-P", "-c", WRITER, str(ckpt_dir)])
        try:
            deadline = time.time() + 60
            killed_mid_write = False
            while time.time() < deadline:
                names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
                temps = [n for n in names if n.endswith(".tmp") and n.startswith(".step_")]
                if "latest" in names and temps and proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_mid_write = True
                    break
                time.sleep(0.02)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert killed_mid_write, "the writer never reached a checkpoint write"
        assert any(n.endswith(".tmp") for n in os.listdir(ckpt_dir)), "kill was not mid-write"
        state = load_checkpoint(str(ckpt_dir))
        step = state["step"]
        assert step >= 1
        assert torch.equal(state["data"], torch.full((1 << 18,), float(step)))
        assert torch.equal(state["tail"], torch.full((1 << 18,), float(step)))
    save_checkpoint({"step": 999}, str(ckpt_dir), 999)  # the next save clears stale temp files
    assert not any(n.endswith(".tmp") for n in os.listdir(ckpt_dir))
    assert load_checkpoint(str(ckpt_dir))["step"] == 999


def test_checkpoint_holds_plain_data_and_checksum(tmp_path):
    ckpt_dir = str(tmp_path / "checkpoints")
    gen = torch.Generator().manual_seed(3)
    path = save_checkpoint({"step": 1, "rng": rng_state({"g": gen})}, ckpt_dir, 1)
    sidecar = json.load(open(path + ".json"))
    assert sidecar["bytes"] == os.path.getsize(path) and len(sidecar["sha256"]) == 64
    state = torch.load(path, weights_only=True)  # loads with the safe unpickler alone
    expected = torch.rand(2, generator=gen)
    set_rng_state(state["rng"], {"g": gen})
    assert torch.equal(torch.rand(2, generator=gen), expected)
    with pytest.raises(TypeError, match=r"state\['bad'\]: a Generator"):
        save_checkpoint({"bad": gen}, ckpt_dir, 2)
    assert [os.path.basename(p) for p in list_checkpoints(ckpt_dir)] == ["step_00000001.pt"]


def test_one_rule_for_pointers_links_and_special_files(tmp_path):
    """issue 19 §2: every way of opening a checkpoint refuses a symlinked ``latest`` without
    reading it, a step file linked from outside the run, and FIFOs (without blocking)."""
    from fault_cases_data import deadline

    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    for step in (1, 2):
        save_checkpoint({"step": step}, str(ckpts), step)
    openers = {
        "resolve": resolve_checkpoint,
        "load": load_checkpoint,
        "open": open_checkpoint,
        "resume": lambda path: load_latest_intact(path, required=()),
    }
    secret = tmp_path / "secret.txt"
    secret.write_text("step_00000001.pt TOP-SECRET\n")
    latest = ckpts / "latest"
    latest.unlink()
    latest.symlink_to(secret)
    for name, opener in openers.items():
        with pytest.raises(CheckpointError, match="latest: a symlink; refusing") as err:
            opener(str(run))
        assert "TOP-SECRET" not in str(err.value), name
    latest.unlink()
    os.mkfifo(latest)
    with deadline("FIFO latest", 20), pytest.raises(CheckpointError, match=r"a FIFO"):
        open_checkpoint(str(run))
    latest.unlink()
    latest.write_text("step_00000002.pt\n")
    assert open_checkpoint(str(run))[0]["step"] == 2

    # a step file that resolves outside the run: refused through the run and when named
    other = tmp_path / "other" / "checkpoints"
    theirs = save_checkpoint({"step": 9}, str(other), 9)
    link = ckpts / "step_00000009.pt"
    link.symlink_to(theirs)
    (ckpts / "step_00000009.pt.json").write_bytes(open(theirs + ".json", "rb").read())
    latest.unlink()  # without a pointer the newest step file (the link) comes first
    for name in ("resolve", "load", "open"):
        with pytest.raises(CheckpointError, match="a link to a file outside"):
            openers[name](str(run))
    with pytest.raises(CheckpointError, match="a link to a file outside"):
        open_checkpoint(str(link))
    state, path = openers["resume"](str(run))  # resume: skips it for the run's own step 2
    assert state["step"] == 2 and path.endswith("step_00000002.pt")
    # a link inside the run, or a file the user names that is not a run's step file, is fine
    os.unlink(link)
    link.symlink_to(ckpts / "step_00000002.pt")
    (ckpts / "step_00000009.pt.json").write_bytes((ckpts / "step_00000002.pt.json").read_bytes())
    assert open_checkpoint(str(run))[0]["step"] == 2
    (tmp_path / "best.pt").symlink_to(theirs)
    (tmp_path / "best.pt.json").symlink_to(theirs + ".json")
    assert open_checkpoint(str(tmp_path / "best.pt"))[0]["step"] == 9

    side = ckpts / "step_00000002.pt.json"
    side.unlink()
    os.mkfifo(side)
    with deadline("FIFO sidecar", 20), pytest.raises(CheckpointError, match="sidecar .*a FIFO"):
        open_checkpoint(str(ckpts / "step_00000002.pt"))
