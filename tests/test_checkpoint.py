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
    atomic_torch_save,
    list_checkpoints,
    load_checkpoint,
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
