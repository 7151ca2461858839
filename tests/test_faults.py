"""Fault injection (issue 10 §10): signals at random points, corrupt and malicious checkpoints.

Every case injects faults and counts the ones the code survived: an interrupted run that resumes
bit-identical to an uninterrupted one, a damaged checkpoint that is refused with a clear error (or
skipped for the newest intact one), a crafted file that runs nothing. At the end of the module one
line is printed: ``faults injected: N, survived: N, lost: 0``.

The signal trials run in one long-lived training subprocess (a "server" that reads commands on
stdin), so torch and the tokenizer are imported once, not once per trial: each trial is one
``train()`` call in a fresh run directory, interrupted by SIGINT or SIGTERM sent to the process or
to its whole process group (DataLoader workers included) after a random delay, then resumed with
``--resume`` semantics and compared with the reference run: losses, weights, EMA, ITC queue,
``queue_ptr``, centres and optimizer state bit for bit.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from semmim.checkpoint import (
    TRAIN_KEYS,
    CheckpointError,
    file_sha256,
    load_checkpoint,
    load_latest_intact,
    read_checkpoint,
    sidecar_path,
)
from semmim.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_KEYS = ("loss", "itc", "itm", "mlm", "glob", "mim")
STEPS = 10
_TALLY = {"injected": 0, "survived": 0}


@pytest.fixture(scope="module", autouse=True)
def _fault_summary(request):
    yield
    line = (
        f"faults injected: {_TALLY['injected']}, survived: {_TALLY['survived']}, "
        f"lost: {_TALLY['injected'] - _TALLY['survived']}"
    )
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line("")
            reporter.write_line(line)
        else:
            print(line)


def _inject(n: int = 1) -> None:
    _TALLY["injected"] += n


def _survived(n: int = 1) -> None:
    _TALLY["survived"] += n


# ----------------------------------------------------------------------------- the train server
SERVER = textwrap.dedent(
    """
    import json, signal, sys, time
    import torch
    from semmim import from_preset
    from semmim.config import TrainConfig
    from semmim.train import train

    torch.set_num_threads(1)
    # Between trials a late signal is ignored (inside train() it is a stop request).
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *a: None)
    cfg = from_preset("tiny", {"vision.image_size": 32, "itc.queue_size": 16})
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        tcfg = TrainConfig(
            data="synthetic:24:4", out=cmd["out"], steps=STEPS, batch_size=4, log_every=1,
            ckpt_every=4, keep_ckpts=2, num_workers=cmd["workers"], eval_at_end=False,
            lr=1e-3, threads=1, seed=3,
        )
        print(json.dumps({"started": cmd["out"]}), flush=True)
        t0 = time.perf_counter()
        s = train(cfg, tcfg, resume=cmd["resume"])
        print(json.dumps({"step": s["step"], "interrupted": s["interrupted"],
                          "seconds": time.perf_counter() - t0}), flush=True)
    """
).replace("STEPS", str(STEPS))


class _Server:
    def __init__(self, log_path: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.stderr = open(log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: killpg reaches it and its workers
        )
        self.log_path = log_path
        assert self.read(timeout=180).get("ready"), self.tail()

    def tail(self, chars: int = 3000) -> str:
        """The end of the server's stderr (its log and progress bars)."""
        self.stderr.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def read(self, timeout: float) -> dict:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.time())):
                line = self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"train server exited:\n{self.tail()}")
                if line.startswith("{"):
                    return json.loads(line)
        raise AssertionError(f"train server: no reply in {timeout} s:\n{self.tail()}")

    def run(self, out: str, resume: bool = False, workers: int = 0, hit=None) -> dict:
        """One train() call; ``hit(pid)`` is called once it has started (to send a signal)."""
        self.proc.stdin.write(json.dumps({"out": out, "resume": resume, "workers": workers}) + "\n")
        self.proc.stdin.flush()
        assert "started" in self.read(timeout=60)
        if hit is not None:
            hit(self.proc.pid)
        return self.read(timeout=120)

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = _Server(str(tmp_path_factory.mktemp("server") / "stderr.log"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """The uninterrupted run: its directory and training time."""
    base = tmp_path_factory.mktemp("reference")
    server.run(str(base / "warm-up"))  # first calls pay one-time costs; time a warm run
    out = str(base / "run")
    result = server.run(out)
    assert result["step"] == STEPS and not result["interrupted"]
    return out, result["seconds"]


def _log_losses(run: str) -> list[tuple]:
    with open(os.path.join(run, "log.csv"), newline="") as f:
        return [(int(r["step"]), *(r[k] for k in LOSS_KEYS)) for r in csv.DictReader(f)]


def _equal(a, b, where: str = "state") -> list[str]:
    """Paths where two checkpoint structures differ (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        return [] if same and torch.equal(a, b) else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [where]
        return [d for k in a for d in _equal(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _equal(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def _same_as_reference(run: str, ref: str) -> list[str]:
    a, b = load_checkpoint(run, required=TRAIN_KEYS), load_checkpoint(ref, required=TRAIN_KEYS)
    diffs = []
    for key in ("model", "optimizer", "scheduler", "step", "epoch", "batch_in_epoch"):
        diffs += _equal(a[key], b[key], key)
    for key in ("image_queue", "text_queue", "queue_ptr", "glob_center", "mim_center"):
        if key in b["model"] and key not in a["model"]:
            diffs.append(key)
    if _log_losses(run) != _log_losses(ref):
        diffs.append("log.csv losses")
    return diffs


# ------------------------------------------------------------------------------- signal trials
MODES = [(sig, target) for sig in ("SIGINT", "SIGTERM") for target in ("process", "group")]
TRIALS = [(sig, target, k) for k in range(3) for sig, target in MODES]  # 12 trials


def test_signals_at_random_points_resume_bit_exact(server, reference, tmp_path):
    ref, seconds = reference
    rng = random.Random(20261201)
    interrupted_mid_run, failures = 0, []
    for i, (sig_name, target, _) in enumerate(TRIALS):
        _inject()
        run = str(tmp_path / f"trial{i}")
        sig = getattr(signal, sig_name)
        # Up to the reference's training time: a few signals land after the last step.
        delay = rng.uniform(0.0, seconds)

        def hit(pid, sig=sig, target=target, delay=delay):
            time.sleep(delay)
            (os.killpg if target == "group" else os.kill)(pid, sig)

        workers = 2 if target == "group" else 1  # the group signal also reaches the workers
        first = server.run(run, workers=workers, hit=hit)
        if first["interrupted"] and first["step"] < STEPS:
            interrupted_mid_run += 1
            assert os.path.exists(os.path.join(run, "checkpoints", "latest")), first
        second = server.run(run, resume=True)
        diffs = [] if second["step"] == STEPS else [f"resumed run ended at {second['step']}"]
        diffs += _same_as_reference(run, ref)
        if diffs:
            failures.append(f"trial {i} {sig_name}->{target} at {delay:.2f}s {first}: {diffs[:5]}")
        else:
            _survived()
    assert not failures, "\n".join(failures)
    assert interrupted_mid_run >= len(TRIALS) // 2, (
        f"only {interrupted_mid_run}/{len(TRIALS)} trials were interrupted before the end"
    )


def test_resume_falls_back_to_newest_intact_checkpoint(server, reference, tmp_path):
    """A flipped bit in the newest checkpoint: --resume says so and continues from the older one."""
    _inject()
    ref, _ = reference
    run = str(tmp_path / "run")
    first = server.run(run)  # a full run: checkpoints at steps 8 and 10 are kept
    assert first["step"] == STEPS
    _flip_bit(os.path.join(run, "checkpoints", f"step_{STEPS:08d}.pt"))
    log_before = len(server.tail(10**9))
    second = server.run(run, resume=True)  # resumes from step 8, redoes steps 9 and 10
    assert second["step"] == STEPS
    said = server.tail(10**9)[log_before:]
    assert "checksum mismatch" in said and "falling back to" in said and "step_00000008" in said
    assert "resumed from step 8" in said or second["step"] == STEPS
    assert _same_as_reference(run, ref) == []
    _survived()


# ---------------------------------------------------------------------- corrupt checkpoint files
def _flip_bit(path: str, offset: int | None = None) -> None:
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        pos = len(data) // 2 if offset is None else offset
        data[pos] ^= 0x10
        f.seek(0)
        f.write(data)


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _zero(path: str) -> None:
    open(path, "wb").close()


def _random_bytes(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(random.Random(0).randbytes(size))
    _rewrite_sidecar(path)  # even with a matching checksum the bytes are not a checkpoint


def _missing_key(path: str) -> None:
    state = torch.load(path, weights_only=True)
    del state["optimizer"]
    torch.save(state, path)
    _rewrite_sidecar(path)


def _rewrite_sidecar(path: str) -> None:
    meta = {"file": os.path.basename(path), "bytes": os.path.getsize(path)}
    meta.update(sha256=file_sha256(path), format=2)
    with open(sidecar_path(path), "w") as f:
        json.dump(meta, f)


CORRUPTIONS = {
    "truncated": (_truncate, "truncated"),
    "zero-length": (_zero, "zero-length"),
    "random bytes": (_random_bytes, "not a torch checkpoint"),
    "key missing": (_missing_key, "missing key(s) ['optimizer']"),
    "flipped bit": (_flip_bit, "checksum mismatch"),
    "no sidecar": (lambda p: os.unlink(sidecar_path(p)), "no checksum sidecar"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_named_and_skipped(kind, reference, tmp_path, caplog):
    _inject()
    ref, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    ckpts = run / "checkpoints"
    newest = str(ckpts / f"step_{STEPS:08d}.pt")
    corrupt, needle = CORRUPTIONS[kind]
    corrupt(newest)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(newest, required=TRAIN_KEYS)
    assert newest in str(err.value) and needle in str(err.value), str(err.value)
    with caplog.at_level(logging.WARNING, logger="semmim.checkpoint"):
        state, path = load_latest_intact(str(ckpts))
    assert state["step"] == 8 and path.endswith("step_00000008.pt")
    assert "falling back to" in caplog.text and needle in caplog.text
    _survived()


def test_no_intact_checkpoint_is_a_clear_cli_error(reference, tmp_path, capsys):
    _inject(2)
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    for p in (run / "checkpoints").glob("step_*.pt"):
        _truncate(str(p))
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "truncated" in err and "Traceback" not in err
    _survived()
    assert main(["eval", "--ckpt", str(run)]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "Traceback" not in err
    _survived()


# --------------------------------------------------------------------------- malicious files
class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    path = str(ckpts / "step_00000001.pt")
    torch.save({"model": {}, "step": 1, "payload": _Evil(str(marker))}, path)
    _rewrite_sidecar(path)  # an attacker can write a matching checksum too
    (ckpts / "latest").write_text("step_00000001.pt\n")
    _inject(3)
    with pytest.raises(CheckpointError, match="refused") as err:
        read_checkpoint(path)
    assert path in str(err.value) and "system" in str(err.value)
    _survived()
    assert main(["eval", "--ckpt", str(tmp_path / "run")]) == 2
    assert "refused" in capsys.readouterr().err
    _survived()
    assert main(["train", "--resume", "--out", str(tmp_path / "run")]) == 2
    assert "refused" in capsys.readouterr().err
    assert not marker.exists(), "the pickled os.system call ran"
    _survived()


@pytest.mark.parametrize("pointer", ["../../../etc/passwd", "/etc/passwd", "link"])
def test_escaping_latest_pointer_is_refused(pointer, reference, tmp_path, capsys):
    _inject()
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    ckpts = run / "checkpoints"
    if pointer == "link":  # a step file that is a symlink out of the run
        outside = tmp_path / "outside.pt"
        shutil.copy(ckpts / f"step_{STEPS:08d}.pt", outside)
        (ckpts / "step_00000099.pt").symlink_to(outside)
        pointer = "step_00000099.pt"
    (ckpts / "latest").write_text(pointer + "\n")
    with pytest.raises(CheckpointError, match="refus"):
        load_latest_intact(str(run))
    assert main(["eval", "--ckpt", str(run)]) == 2
    assert "refus" in capsys.readouterr().err
    _survived()


# ----------------------------------------------------------------------------------- bad data
def test_bad_data_cases(tmp_path):
    """The data cases of tests/fault_cases_data.py: each skipped and counted, or a clear error."""
    from fault_cases_data import CASES, run_case

    failures = []
    for i, case in enumerate(CASES):
        _inject()
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        try:
            run_case(case, folder)
        except AssertionError as err:
            failures.append(f"{case.name}: {err}")
        else:
            _survived()
    assert not failures, "\n".join(failures)


def test_training_on_data_without_one_good_image_is_a_clear_error(tmp_path, capsys):
    _inject()
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(6):
        (folder / f"x{i}.png").write_bytes(b"not a png")
        (folder / f"x{i}.txt").write_text(f"caption {i}")
    argv = ["train", "--preset", "tiny", "--data", f"folder:{folder}", "--steps", "2"]
    assert main([*argv, "--out", str(tmp_path / "run"), "--num-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "can be decoded" in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()
    _survived()


# --- issue 19 §2–4: inputs that point elsewhere, downstream loaders, small faults
# (the data cases of these classes are in tests/fault_cases_data.py, run by test_bad_data_cases)
def _ckpt_commands(run) -> dict[str, list[str]]:
    """The three commands that open a checkpoint, on run directory ``run``."""
    return {
        "eval": ["eval", "--ckpt", str(run)],
        "finetune --ckpt": ["finetune", "retrieval", "--ckpt", str(run), "--out", f"{run}-ft"],
        "train --resume": ["train", "--resume", "--out", str(run)],
    }


def test_symlinked_latest_is_refused_by_every_command_unread(reference, tmp_path, capsys):
    """A ``latest`` that is a symlink (to a file outside, whose text must not be shown) or a FIFO
    (that would block a reader): exit 2 from eval, finetune --ckpt and train --resume."""
    from fault_cases_data import deadline

    secret = tmp_path / "secret.txt"
    secret.write_text("step_00000010.pt root:x:0:0:TOP-SECRET-LINE\n")
    for kind in ("symlink", "fifo"):
        run = tmp_path / kind
        shutil.copytree(reference[0], run)
        latest = run / "checkpoints" / "latest"
        latest.unlink()
        if kind == "symlink":
            latest.symlink_to(secret)
        else:
            os.mkfifo(latest)
        for name, argv in _ckpt_commands(run).items():
            _inject()
            with deadline(f"{kind} latest, {name}", 60):
                code = main(argv)
            err = capsys.readouterr().err
            assert code == 2, (kind, name, err)
            assert ("a symlink; refusing" if kind == "symlink" else "a FIFO") in err, err
            assert "TOP-SECRET" not in err and "Traceback" not in err, err
            _survived()


def test_step_file_linked_from_outside_is_refused_by_every_command(
    reference, tmp_path, capsys, caplog
):
    """A step_*.pt that is a symlink out of the run (another run's checkpoint): eval and
    finetune --ckpt refuse it (through the run directory and when named), as --resume does (it
    resumes from the run's own newest intact checkpoint instead, and says why)."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    other = tmp_path / "other-seed.pt"
    shutil.copy(run / "checkpoints" / f"step_{STEPS:08d}.pt", other)
    shutil.copy(run / "checkpoints" / f"step_{STEPS:08d}.pt.json", f"{other}.json")
    link = run / "checkpoints" / "step_00000099.pt"
    link.symlink_to(other)
    shutil.copy(f"{other}.json", f"{link}.json")
    (run / "checkpoints" / "latest").unlink()  # the newest step file is the link
    commands = _ckpt_commands(run)
    commands["eval (file named)"] = ["eval", "--ckpt", str(link)]
    commands["finetune --ckpt (file named)"] = ["finetune", "vqa", "--ckpt", str(link)]
    for name, argv in commands.items():
        _inject()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="semmim"):
            code = main(argv)
        err = capsys.readouterr().err + caplog.text  # the resume's fallback is a log warning
        assert "a link to a file outside" in err and "Traceback" not in err, (name, err)
        if name == "train --resume":
            assert code == 0 and "falling back to" in err, err
            state, path = load_latest_intact(str(run))
            assert os.path.realpath(path).startswith(os.path.realpath(run)), path
        else:
            assert code == 2, (name, err)
        _survived()


def test_semmim_data_never_prints_a_caption_linked_from_outside(tmp_path, capsys):
    from fault_cases_data import pairs_folder

    _inject()
    root = pairs_folder(tmp_path / "d", n=2)
    (tmp_path / "passwd").write_text("root:x:0:0:TOP-SECRET-LINE\n")
    (root / "a.png").write_bytes((root / "good0.png").read_bytes())
    (root / "a.txt").symlink_to(tmp_path / "passwd")
    assert main(["data", f"folder:{root}", "--val-size", "0"]) == 0
    out = capsys.readouterr()
    assert "TOP-SECRET" not in out.out + out.err
    assert "caption file links outside the data folder: 1" in out.out, out.out
    _survived()


def test_compressed_shard_with_a_huge_text_member_lists_in_bounded_memory(tmp_path):
    """The issue's shard in small: a .tar.gz whose .txt member is 64 MiB of zeros (compressed to
    ~64 KiB) is listed with a bounded read; the member is skipped and counted."""
    import io
    import tarfile
    import tracemalloc

    from fault_cases_data import png_bytes

    _inject()
    path = tmp_path / "big.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, data in (("s0.png", png_bytes()), ("s0.txt", b"a small caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, data in (("s1.txt", bytes(64 * 2**20)), ("s1.png", png_bytes((1, 2, 3)))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            del data
    assert os.path.getsize(path) < 2**20
    from semmim.data import open_data

    tracemalloc.start()
    try:
        source = open_data(f"wds:{path}", 0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.caption for r in source.train] == ["a small caption"]
    assert source.skips.counts == {"caption over 16384 bytes": 1}
    assert peak < 4 * 2**20, f"listing allocated {peak / 2**20:.1f} MiB for one 64 MiB member"
    _survived()


def test_downstream_data_faults_are_clear_cli_errors(tmp_path, capsys):
    """Truncated / non-UTF-8 karpathy: and vqa: files end `semmim finetune` with exit 2 naming the
    file (no traceback, no training)."""
    from fault_cases_data import _karpathy, _q, _vqa

    cases = {
        "truncated karpathy": (
            "retrieval",
            _karpathy([], raw=b'{"images": [{"sentences": [{"raw": "a ca'),
            r"dataset_coco\.json.* not valid JSON \(the file ends early",
        ),
        "non-UTF-8 karpathy": (
            "caption",
            _karpathy([], raw=b'{"images": [{"filename": "\xff.jpg"}]}'),
            r"dataset_coco\.json.* not valid UTF-8",
        ),
        "truncated vqa annotations": (
            "vqa",
            _vqa([_q(1)], raw=b'{"annotations": [{"question_id": 1'),
            r"a\.json.* not valid JSON \(the file ends early",
        ),
    }
    for i, (name, (task, build, needle)) in enumerate(cases.items()):
        _inject()
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        spec = build(folder)
        out = folder / "run"
        argv = ["finetune", task, "--data", spec, "--steps", "1", "--out", str(out)]
        assert main(argv) == 2, name
        err = capsys.readouterr().err
        assert re.search(needle, err) and "Traceback" not in err, (name, err)
        assert not (out / "checkpoints").exists(), name
        _survived()


def test_float_tiff_trains_as_an_image_not_black(tmp_path):
    """A 32-bit float TIFF (mode F, 0..1) reaches the model as its picture, not a black square."""
    import numpy as np
    from PIL import Image

    from semmim.data import PairDataset, open_data
    from semmim.transforms import EvalTransform

    _inject()
    root = tmp_path / "d"
    root.mkdir()
    ramp = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))
    Image.fromarray(ramp).save(root / "ramp.tif")
    (root / "ramp.txt").write_text("a grey ramp\n")
    source = open_data(f"folder:{root}", 0)
    item = PairDataset(source.train, EvalTransform(32))[0]
    assert "bad" not in item
    black = EvalTransform(32)(Image.new("RGB", (64, 64)), "")[0]
    assert item["image"].std() > 0.5 and not torch.allclose(item["image"], black)
    _survived()


def test_small_op_faults_are_clear_errors(monkeypatch):
    """gumbel_noise on a missing CUDA device, prototype_cross_entropy temperatures whose
    reciprocal overflows and meta tensors: one-line ValueErrors naming the argument."""
    import semmim.kernels as K

    cases = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases.append((lambda: K.gumbel_noise((2, 3), seed=0, device="cuda"), "CUDA is not available"))
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    w, c = torch.randn(5, 8), torch.zeros(5)
    for t in (1e-39, 5e-324):
        cases.append(
            (lambda t=t: K.prototype_cross_entropy(z, z, w, w, c, t, 0.04), "student_temp")
        )
        cases.append((lambda t=t: K.prototype_cross_entropy(z, z, w, w, c, 0.1, t), "teacher_temp"))
    meta = [t.to("meta") for t in (z, w, c)]
    cases.append(
        (
            lambda: K.prototype_cross_entropy(
                meta[0], meta[0], meta[1], meta[1], meta[2], 0.1, 0.04
            ),
            "meta tensor",
        )
    )
    for call, needle in cases:
        _inject()
        with pytest.raises(ValueError, match=needle) as err:
            call()
        assert "\n" not in str(err.value)
        _survived()
