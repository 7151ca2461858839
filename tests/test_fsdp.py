"""``--fsdp`` (FSDP2) on CPU with gloo, 2 processes, and sharded checkpoints.

Against DDP: same losses and EMA copy within float-reduction-order tolerance. Sharded steps: exact
resume 1 → 1 and 2 → 2, resume on another process count (2 → 1 after a rank is SIGKILLed, 1 → 2),
and every damaged or crafted step directory refused by name.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from run_helpers import dist_env, free_port, small_run

from semmim import checkpoint as ckpt
from semmim import checkpoint_dcp, from_preset

TINY = {"vision.image_size": 32}
# FSDP vs DDP: the same computation, float sums reduced in another order (measured on CPU over
# 20 steps: losses ~25 differ by at most 4e-6, EMA weights by 6e-6, trained weights by 1.3e-4).
# Trained weights: AdamW divides by sqrt(v), which turns reduction-order noise in tiny gradients
# into up to lr-sized steps, so they are held to one step at lr 1e-3; the EMA copy sees
# (1 - momentum) of that.
LOSS_ATOL = 1e-4
WEIGHT_ATOL = 1e-3
EMA_ATOL = 5e-5


def _cfg(out, **kw):
    return small_run(out, **{"data": "synthetic:64:8", "device": "cpu", **kw})


def _worker(rank, world, port, out, kw, resume, allow) -> None:
    if world > 1:
        dist_env(rank, world, port)
    torch.set_num_threads(1)
    from semmim.train import train

    summary = train(
        from_preset("tiny", **TINY),
        _cfg(out, **kw),
        resume=resume,
        return_model=True,
        allow_changes=allow,
    )
    if rank == 0:
        torch.save(
            {
                "losses": [h["loss"] for h in summary["history"]],
                "steps": [h["step"] for h in summary["history"]],
                "step": summary["step"],
                "state": summary["model"].state_dict(),
            },
            os.path.join(out, "result.pt"),
        )


def _spawn(world, out, resume=False, allow=False, **kw) -> dict:
    mp.spawn(
        _worker,
        args=(world, free_port(), str(out), kw, resume, allow),
        nprocs=world,
        join=True,
    )
    return torch.load(os.path.join(out, "result.pt"))


def _max_diff(a, b) -> float:
    return max(
        (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()
    )


def test_fsdp_matches_ddp_and_shards_the_checkpoint(tmp_path):
    ddp = _spawn(2, tmp_path / "ddp", steps=4)
    fs = _spawn(2, tmp_path / "fsdp", steps=4, fsdp=True)
    assert fs["step"] == ddp["step"] == 4
    diffs = [abs(a - b) for a, b in zip(fs["losses"], ddp["losses"], strict=True)]
    assert max(diffs) <= LOSS_ATOL, diffs
    a, b = fs["state"], ddp["state"]
    assert a.keys() == b.keys()
    ema = {k: a[k] for k in a if k.startswith("ema.")}
    assert ema and _max_diff(ema, b) <= EMA_ATOL  # the EMA copy follows the same weights
    assert _max_diff(a, b) <= WEIGHT_ATOL
    # the queue holds both ranks' features (all-gathered, identical on the ranks)
    assert int(a["queue_ptr"]) == int(b["queue_ptr"]) == 32
    step = tmp_path / "fsdp" / "checkpoints" / "step_00000004"
    names = set(os.listdir(step))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt", "manifest.json"} <= names
    state, path = ckpt.open_checkpoint(str(tmp_path / "fsdp"), required=ckpt.TRAIN_KEYS)
    assert path.endswith("step_00000004") and state["world_size"] == 2
    assert all(torch.equal(state["model"][k], a[k]) for k in a if k in state["model"])


@pytest.mark.slow
def test_fsdp_20_steps_vs_ddp_and_one_process(tmp_path):
    """20 steps: FSDP = DDP within LOSS_ATOL; one process with the same global batch (8) draws
    other masks (per-rank seeds) and splits the batch otherwise, so it is compared loosely."""
    ddp = _spawn(2, tmp_path / "ddp", steps=20)
    fs = _spawn(2, tmp_path / "fsdp", steps=20, fsdp=True)
    one = _spawn(1, tmp_path / "one", steps=20, batch_size=8)
    diffs = [abs(a - b) for a, b in zip(fs["losses"], ddp["losses"], strict=True)]
    assert max(diffs) <= LOSS_ATOL, diffs
    ema = {k: v for k, v in fs["state"].items() if k.startswith("ema.")}
    assert _max_diff(ema, ddp["state"]) <= EMA_ATOL
    assert _max_diff(fs["state"], ddp["state"]) <= WEIGHT_ATOL
    # measured: means 24.633 (FSDP) vs 24.620 (one process); single steps differ by up to 1.1
    mean_fs, mean_one = sum(fs["losses"]) / 20, sum(one["losses"]) / 20
    assert abs(mean_fs - mean_one) / mean_one < 0.01, (fs["losses"], one["losses"])


@pytest.mark.slow
def test_fsdp_resume_two_to_two_is_exact(tmp_path):
    whole = _spawn(2, tmp_path / "whole", steps=6, fsdp=True)
    _spawn(2, tmp_path / "cut", steps=6, fsdp=True, stop_at=3)
    cut = _spawn(2, tmp_path / "cut", resume=True, steps=6, fsdp=True)
    assert cut["steps"] == [4, 5, 6] and cut["losses"] == whole["losses"][3:]
    for k, v in whole["state"].items():
        assert torch.equal(v, cut["state"][k]), k


@pytest.mark.slow
def test_fsdp_resume_one_to_two(tmp_path):
    """A one-process --fsdp run writes sharded steps; two processes continue it."""
    _spawn(1, tmp_path, steps=4, fsdp=True, stop_at=2)
    assert ckpt.resolve_checkpoint(str(tmp_path)).endswith("step_00000002")
    with pytest.raises(mp.ProcessRaisedException, match="world_size: 1 -> 2"):
        _spawn(2, tmp_path, resume=True, steps=4, fsdp=True)
    out = _spawn(2, tmp_path, resume=True, allow=True, steps=4, fsdp=True)
    assert out["steps"] == [3, 4]
    state, _ = ckpt.open_checkpoint(str(tmp_path), required=ckpt.TRAIN_KEYS)
    assert state["step"] == 4 and state["world_size"] == 2 and len(state["rng"]) == 2


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker ``rank`` (a child of ``parent`` with RANK=rank)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find rank 1")
def test_torchrun_fsdp_kill_a_rank_then_resume_on_one_process(tmp_path):
    """The CLI under torchrun: rank 1 SIGKILLed mid-run; one process resumes from the newest
    complete sharded step (a half-written one is never picked) and continues."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["-m", "semmim", "train", "--out", str(out), "--device", "cpu"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common]
    cmd += ["--preset", "tiny", "--set", "vision.image_size=32", "--data", "synthetic:64:8"]
    cmd += ["--steps", "400", "--batch-size", "4", "--num-workers", "0", "--no-eval"]
    cmd += ["--log-every", "1", "--ckpt-every", "2", "--fsdp"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = out / "checkpoints" / "latest"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if latest.exists() and latest.read_text().strip() >= "step_00000004":
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    saved = int(latest.read_text().strip()[len("step_") :])
    assert 4 <= saved < 400
    resume = [sys.executable, *common, "--resume", "--allow-changes"]
    resume += ["--stop-at", str(saved + 2)]
    done = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world_size: 2 -> 1" in done.stderr  # the allowed change is named
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == saved + 2
    state, path = ckpt.open_checkpoint(str(out), required=ckpt.TRAIN_KEYS)
    assert state["step"] == saved + 2 and state["world_size"] == 1
    assert not [n for n in os.listdir(out / "checkpoints") if n.endswith(".tmp")]


# --------------------------------------------------------------- one process: damaged steps
@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A one-process --fsdp run: 3 steps, sharded steps 2 and 3 (unsharded model)."""
    from semmim.train import train

    out = tmp_path_factory.mktemp("sharded")
    train(from_preset("tiny", **TINY), _cfg(out, steps=3, ckpt_every=2, fsdp=True))
    return out


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rehash(step_dir) -> None:
    """Rewrite manifest.json for the files as they are now (a crafted, self-consistent step)."""
    path = os.path.join(step_dir, "manifest.json")
    manifest = json.loads(open(path).read())
    for name in manifest["files"]:
        file = os.path.join(step_dir, name)
        manifest["files"][name] = {
            "bytes": os.path.getsize(file),
            "sha256": ckpt.file_sha256(file),
        }
    with open(path, "w") as f:
        json.dump(manifest, f)


def test_sharded_steps_rotate_and_resume_exactly_on_one_process(tmp_path, sharded_run):
    from semmim.train import train

    names = sorted(os.listdir(sharded_run / "checkpoints"))
    assert names == ["latest", "step_00000002", "step_00000003"]
    assert (sharded_run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    whole = train(from_preset("tiny", **TINY), _cfg(tmp_path / "w", steps=5, fsdp=True))
    train(from_preset("tiny", **TINY), _cfg(tmp_path / "c", steps=5, fsdp=True, stop_at=2))
    cut = train(
        from_preset("tiny", **TINY),
        _cfg(tmp_path / "c", steps=5, fsdp=True),
        resume=True,
        return_model=True,
    )
    assert [h["loss"] for h in cut["history"]] == [h["loss"] for h in whole["history"]][2:]
    state, _ = ckpt.open_checkpoint(str(tmp_path / "w"), required=ckpt.TRAIN_KEYS)
    for k, v in cut["model"].state_dict().items():
        assert torch.equal(v, state["model"][k]), k


def test_sharded_step_resumes_without_fsdp(tmp_path, sharded_run):
    """A sharded step continues as an ordinary run (its optimizer state by parameter names)."""
    from semmim.train import train

    run = _copy_run(sharded_run, tmp_path / "run")
    tcfg = _cfg(run, steps=3, ckpt_every=2)  # fsdp off: the next checkpoint is a .pt file
    out = train(from_preset("tiny", **TINY), tcfg.override({"steps": 4}), resume=True)
    assert out["step"] == 4
    assert ckpt.resolve_checkpoint(str(run)).endswith("step_00000004.pt")


@pytest.mark.parametrize(
    "damage, match",
    [
        ("manifest", r"step_00000003/manifest.json: missing"),
        ("truncate", r"step_00000003/__0_0.distcp: \d+ bytes, but \d+ were written \(truncated\)"),
        ("flip", r"step_00000003/meta.pt: checksum mismatch"),
        ("code", r"step_00000003/.metadata: refused: it names code to run"),
        ("bytes_entry", r"step_00000003/.metadata: entry 'evil' is not a tensor; refused"),
    ],
)
def test_damaged_sharded_step_is_refused_by_name(tmp_path, sharded_run, damage, match):
    run = _copy_run(sharded_run, tmp_path / "run")
    step = run / "checkpoints" / "step_00000003"
    marker = tmp_path / "ran"
    if damage == "manifest":
        os.unlink(step / "manifest.json")
    elif damage == "truncate":
        data = (step / "__0_0.distcp").read_bytes()
        (step / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray((step / "meta.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (step / "meta.pt").write_bytes(bytes(data))
    elif damage == "code":

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        (step / ".metadata").write_bytes(pickle.dumps(Evil()))
        _rehash(step)
    else:
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        index = checkpoint_dcp.read_index(str(step))
        index.state_dict_metadata["evil"] = BytesStorageMetadata()
        (step / ".metadata").write_bytes(pickle.dumps(index))
        _rehash(step)
    with pytest.raises(ckpt.CheckpointError, match=match):
        ckpt.open_checkpoint(str(run))
    assert not marker.exists()
    # --resume falls back to the older intact step, naming the damaged one
    state, path = ckpt.load_latest_intact(str(run / "checkpoints"))
    assert path.endswith("step_00000002") and state["step"] == 2


def test_half_written_sharded_step_is_never_picked(tmp_path, sharded_run):
    """A rank killed while writing leaves ``.step_<N>.tmp/``: not a step; the next save removes
    it. A step directory without its manifest (copied in part) is refused by name."""
    from semmim.train import train

    run = _copy_run(sharded_run, tmp_path / "run")
    tmp = run / "checkpoints" / ".step_00000004.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    assert ckpt.resolve_checkpoint(str(run)).endswith("step_00000003")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(str(run / "checkpoints"))] == [
        "step_00000002",
        "step_00000003",
    ]
    partial = run / "checkpoints" / "step_00000009"
    partial.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="step_00000009/manifest.json: missing"):
        ckpt.open_checkpoint(str(partial))
    partial.rmdir()
    train(from_preset("tiny", **TINY), _cfg(run, steps=4, fsdp=True), resume=True)
    assert not tmp.exists()
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000003", "step_00000004"]


def test_fsdp_option_is_validated():
    from semmim.run_config import TrainConfig

    with pytest.raises(ValueError, match="train.fsdp: --fsdp with --compile is not supported"):
        TrainConfig(fsdp=True, compile=True)
    with pytest.raises(ValueError, match="train.fsdp"):
        TrainConfig(fsdp="yes")


@pytest.mark.slow
def test_fsdp_bf16_autocast_matches_ddp(tmp_path):
    """The GPU's precision path on CPU: under bf16 autocast FSDP still computes DDP's step."""
    ddp = _spawn(2, tmp_path / "ddp", steps=2, amp="bf16")
    fs = _spawn(2, tmp_path / "fsdp", steps=2, amp="bf16", fsdp=True)
    assert all(torch.isfinite(torch.tensor(fs["losses"])))
    diffs = [abs(a - b) for a, b in zip(fs["losses"], ddp["losses"], strict=True)]
    assert max(diffs) <= 1e-2, diffs  # bf16 matmuls: reduction order moves more bits


def test_sharded_step_exports_and_evaluates_like_a_file(tmp_path, sharded_run):
    """``semmim export`` and ``eval`` read a sharded step through the same open_checkpoint."""
    from semmim.export import export_hf
    from semmim.model import SemMIM

    step = sharded_run / "checkpoints" / "step_00000003"
    export_hf(str(step), str(tmp_path / "hf"))
    state, _ = ckpt.open_checkpoint(str(sharded_run), required=ckpt.EVAL_KEYS)
    back = SemMIM.from_pretrained(str(tmp_path / "hf"))
    for k, v in back.net.state_dict().items():
        assert torch.equal(v, state["model"][f"net.{k}"]), k
