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
    from semmim.run_config import TrainConfig
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


# --- issue 19 §1: run directories
# Each class of fault around a run directory: a second writer, an existing run, a path that is
# a file or read-only, a truncated run file, a foreign checkpoint, a full disk, an orphaned child,
# results written where the user cannot predict. Every case a clear error or a correct result.
def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(ln.startswith("State:") and "Z" in ln.split()[1] for ln in f)
    except FileNotFoundError:
        return False


def _wait_until(cond, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from semmim.rundir import RunLock
    RunLock(sys.argv[1], command="holder-cmd").acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def test_run_lock_names_its_owner_and_is_released_on_every_exit_path(tmp_path):
    from semmim.rundir import RunDirError, RunLock, lock_owner

    run = str(tmp_path / "run")
    _inject(3)  # a second owner in-process, an exception inside the block, a SIGKILL'd owner
    with RunLock(run, command="first-cmd"):
        with pytest.raises(RunDirError) as err:
            RunLock(run).acquire()
        assert f"pid {os.getpid()}" in str(err.value) and "first-cmd" in str(err.value)
        assert "first-cmd" in lock_owner(run)
    assert lock_owner(run) is None
    _survived()
    with pytest.raises(KeyError), RunLock(run):
        raise KeyError("boom")
    assert lock_owner(run) is None
    _survived()
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", _HOLDER, run], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        owner = lock_owner(run)
        assert owner is not None and f"pid {proc.pid}" in owner and "holder-cmd" in owner
        with pytest.raises(RunDirError, match=f"pid {proc.pid}.*holder-cmd"):
            RunLock(run).acquire()
        proc.kill()  # SIGKILL: no handler runs; the kernel drops the flock with the process
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert lock_owner(run) is None
    RunLock(run).acquire().release()
    _survived()


def test_run_files_are_atomic_and_a_damaged_one_is_named(tmp_path, monkeypatch):
    from semmim.rundir import RunDirError, read_json, write_json, write_text

    path = str(tmp_path / "summary.json")
    write_json(path, {"step": 3})
    _inject()  # a writer that dies half-way leaves the old file, and no temp file
    with monkeypatch.context() as m:
        m.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
        with pytest.raises(OSError):
            write_json(path, {"step": 4})
    assert read_json(path) == {"step": 3} and os.listdir(tmp_path) == ["summary.json"]
    _survived()
    cases = {
        "truncated JSON": '{"step": 3, "tot',
        "empty file": "",
        "not valid JSON": '{"step": 3} trailing',
        "not UTF-8": None,
    }
    for needle, text in cases.items():
        _inject()
        bad = str(tmp_path / "seed_0" / "summary.json")
        if text is None:
            os.makedirs(os.path.dirname(bad), exist_ok=True)
            with open(bad, "wb") as f:
                f.write(b'{"a": "\xff\xfe"}')
        else:
            write_text(bad, text)
        with pytest.raises(RunDirError) as err:
            read_json(bad)
        assert bad in str(err.value) and needle in str(err.value), err.value
        _survived()
    assert read_json(str(tmp_path / "absent.json"), missing_ok=True) is None


_ORPHAN_PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-P", "-c",
        "import os, sys, time\\n"
        "from semmim.rundir import die_with_parent\\n"
        "assert die_with_parent(int(sys.argv[1]))\\n"
        "print('armed', flush=True)\\n"
        "time.sleep(120)\\n", str(os.getpid())], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "armed"
    print(child.pid, flush=True)
    time.sleep(120)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_child_of_a_sigkilled_parent_dies_with_it():
    """The mechanism ablate's child runs use (rundir.die_with_parent): SIGKILL the parent, the
    child receives SIGTERM (a trainer checkpoints and stops) instead of training on as an orphan."""
    _inject()
    parent = subprocess.Popen(
        [sys.executable, "-P", "-c", _ORPHAN_PARENT], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait(timeout=30)
        _wait_until(lambda: not _alive(child), 30, f"the orphaned child {child} to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
    _survived()


def test_empty_generated_captions_are_said_not_silent(caplog, monkeypatch):
    """A decoder that ends every caption at once: the metrics are 0 and the table says why."""
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no Java: the fast tokenizer path
    from semmim.downstream.caption_metrics import caption_metrics, format_caption_table

    refs = {"a": ["a red circle"], "b": ["a blue square"], "c": ["two green stars"]}
    for preds in ({"a": "", "b": "", "c": ""}, {"a": "a red circle", "b": " ", "c": ""}):
        _inject()
        with caplog.at_level(logging.WARNING, logger="semmim.caption"):
            result = caption_metrics(preds, refs)
        empty = sum(not p.strip() for p in preds.values())
        assert result["empty_captions"] == empty
        table = format_caption_table({**result, "n_images": len(preds)})
        assert f"{empty} of {len(preds)} generated captions are empty" in table, table
        assert f"{empty} of {len(preds)} generated captions are empty" in caplog.text
        caplog.clear()
        _survived()
    result = caption_metrics({"a": "a red circle"}, {"a": ["a red circle"]})
    assert result["empty_captions"] == 0 and "WARNING" not in format_caption_table(result)


_TINY = ["--preset", "tiny", "--set", "vision.image_size=32", "itc.queue_size=16", "loss.mlm=0"]
_SMALL_RUN = ["--data", "synthetic:16:4", "--batch-size", "4", "--num-workers", "0"]
_SMALL_RUN += ["--threads", "1", "--no-eval"]


def _train(out, *extra: str) -> int:
    return main(["train", *_TINY, *_SMALL_RUN, "--out", str(out), *extra])


def _files(directory) -> dict[str, bytes]:
    """Every file under ``directory`` (relative path -> bytes), the lock file excepted."""
    out = {}
    for root, _, names in os.walk(directory):
        for n in names:
            p = os.path.join(root, n)
            if n != ".semmim.lock":
                out[os.path.relpath(p, directory)] = open(p, "rb").read()
    return out


def test_out_holding_a_run_is_refused_and_overwrite_moves_it_aside(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--steps", "2") == 0
    before = _files(run)
    capsys.readouterr()
    _inject()  # `semmim train --out RUN` again, without --resume: nothing of RUN may change
    assert _train(run, "--steps", "3") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err, err
    assert "another --out" in err and "Traceback" not in err
    assert _files(run) == before
    _survived()
    _inject()  # the same for finetune, whose default is also a fresh run
    argv = ["finetune", "retrieval", "--preset", "tiny", "--steps", "1", "--out", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "semmim finetune retrieval" in err, err
    assert _files(run) == before
    _survived()
    _inject()  # --overwrite: a new run in RUN, the old one moved aside whole, nothing deleted
    assert _train(run, "--steps", "1", "--overwrite") == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(moved) == 1 and _files(moved[0]) == before
    assert "trained 1/1 steps" in capsys.readouterr().out
    assert load_checkpoint(str(run))["step"] == 1
    _survived()


def test_out_that_is_a_file_or_not_writable_is_refused_before_training(
    tmp_path, capsys, monkeypatch
):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    for argv in (
        ["train", *_TINY, "--out", str(a_file)],
        ["train", *_TINY, "--out", str(a_file / "sub")],
        ["finetune", "vqa", "--out", str(a_file)],
        ["ablate", "--seeds", "0", "--out", str(a_file)],
    ):
        _inject()
        assert main([*argv, "--steps", "1"]) == 2, argv
        err = capsys.readouterr().err
        assert "is a file" in err and str(a_file) in err and "Traceback" not in err, err
        assert a_file.read_text() == "mine"
        _survived()
    # Read-only: the tests run as root here, for whom every directory is writable, so the
    # permission check itself is made to see a read-only directory.
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: False if str(p) == str(ro) else real_access(p, m)
    )
    for argv in (["train", *_TINY], ["ablate", "--seeds", "0"]):
        _inject()
        assert main([*argv, "--steps", "1", "--out", str(ro / "run")]) == 2
        err = capsys.readouterr().err
        assert "not writable" in err and str(ro) in err and "Traceback" not in err, err
        assert os.listdir(ro) == []
        _survived()


_LONG_TRAIN = [sys.executable, "-P", "-m", "semmim", "train", *_TINY, *_SMALL_RUN]
_LONG_TRAIN += ["--steps", "5000", "--ckpt-every", "100000"]


def test_two_writers_into_one_run_directory_the_second_refuses_naming_the_first(tmp_path, capsys):
    from semmim.config import from_preset
    from semmim.run_config import TrainConfig
    from semmim.rundir import RunDirError, lock_owner
    from semmim.train import train

    run = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    first = subprocess.Popen(
        [*_LONG_TRAIN, "--out", run],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    try:
        _wait_until(lambda: lock_owner(run) is not None, 120, "the first trainer's lock")
        for extra in ([], ["--resume"], ["--overwrite"]):
            _inject()
            assert _train(run, "--steps", "2", *extra) == 2, extra
            err = capsys.readouterr().err
            assert f"pid {first.pid}" in err and "in use" in err, err
            assert "semmim train" in err and "Traceback" not in err
            _survived()
        _inject()  # the library entry point is held to the same lock
        with pytest.raises(RunDirError, match=f"pid {first.pid}"):
            train(from_preset("tiny"), TrainConfig(out=run, steps=1))
        _survived()
        _inject()  # a grid into a directory a trainer owns
        assert main(["ablate", "--seeds", "0", "--steps", "1", "--out", run]) == 2
        assert f"pid {first.pid}" in capsys.readouterr().err
        _survived()
        assert first.poll() is None  # the first writer was never disturbed
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert lock_owner(run) is None  # SIGKILL released it


def test_a_grid_rerun_refuses_while_a_run_of_it_still_trains(tmp_path, capsys):
    """An orphan of an earlier grid (here: any process holding a run's lock) makes the rerun
    refuse, naming it, instead of putting a second trainer into that run directory."""
    grid = tmp_path / "grid"
    seed_dir = str(grid / "default" / "seed_0")
    holder = subprocess.Popen(
        [sys.executable, "-P", "-c", _HOLDER, seed_dir], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        _inject()
        argv = ["ablate", "--variants", "default", "--seeds", "0", *_SMALL_RUN[:6]]
        assert main([*argv, "--steps", "1", "--out", str(grid)]) == 2
        err = capsys.readouterr().err
        assert seed_dir in err and f"pid {holder.pid}" in err and "holder-cmd" in err, err
        assert not os.path.exists(os.path.join(seed_dir, "config.json"))
        _survived()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_resume_never_falls_back_to_another_runs_checkpoint(tmp_path, capsys, caplog):
    run, other = tmp_path / "run", tmp_path / "other"
    assert _train(run, "--steps", "2", "--ckpt-every", "1", "--keep-ckpts", "3") == 0
    assert _train(other, "--steps", "3", "--seed", "1", "--ckpt-every", "1") == 0
    ckpts = run / "checkpoints"
    foreign = ckpts / "step_00000009.pt"  # newest by name: the fallback would try it first
    shutil.copy(other / "checkpoints" / "step_00000003.pt", foreign)
    shutil.copy(other / "checkpoints" / "step_00000003.pt.json", sidecar_path(str(foreign)))
    _flip_bit(str(ckpts / "step_00000002.pt"))  # the run's own newest checkpoint is damaged
    capsys.readouterr()
    _inject()
    with caplog.at_level(logging.WARNING):
        assert _train(run, "--steps", "2", "--resume") == 0
    assert "step_00000009.pt" in caplog.text and "another run" in caplog.text, caplog.text
    assert "seed 1 (not 0)" in caplog.text
    assert "trained 2/2 steps" in capsys.readouterr().out  # resumed from its own step 1
    assert load_checkpoint(str(run))["train_config"]["seed"] == 0
    _survived()
    _inject()  # nothing of its own left: a clear error listing why each file was refused
    for name in os.listdir(ckpts):
        if name.startswith("step_00000001") or name.startswith("step_00000002"):
            os.unlink(ckpts / name)
    (ckpts / "latest").write_text("step_00000009.pt\n")
    assert _train(run, "--steps", "3", "--resume") == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "step_00000009.pt" in err and "another run" in err
    _survived()


@pytest.mark.parametrize("kind", ["ENOSPC", "inline_container"])
def test_disk_full_while_checkpointing_is_a_clear_error_and_keeps_the_last_one(
    kind, tmp_path, capsys, monkeypatch
):
    import errno

    from semmim import checkpoint as ckpt_mod
    from semmim import rundir

    run = tmp_path / "run"
    real_save = ckpt_mod.atomic_torch_save

    def full(obj, path):
        if "step_00000002" not in path:
            return real_save(obj, path)
        if kind == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0; "
            "PytorchStreamWriter failed writing file data/3: file write failed"
        )

    monkeypatch.setattr(ckpt_mod, "atomic_torch_save", full)
    free = type("Usage", (), {"total": 10**9, "used": 10**9, "free": 4096})()
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: free)
    _inject()
    assert _train(run, "--steps", "3", "--ckpt-every", "1") == 2
    err = capsys.readouterr().err
    assert f"no space left on {run / 'checkpoints'}" in err and "needs ~" in err, err
    assert "Traceback" not in err
    kept = load_latest_intact(str(run / "checkpoints"))  # verified: size and sha256
    assert kept[1].endswith("step_00000001.pt") and kept[0]["step"] == 1
    assert not [n for n in os.listdir(run / "checkpoints") if n.endswith(".tmp")]
    _survived()


def test_disk_full_writing_a_run_file_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import errno

    from semmim import rundir
    from semmim.train import loop

    run = tmp_path / "run"

    def full(path, obj, indent=2):
        def write(f):
            f.write(b"{")
            raise OSError(errno.ENOSPC, "No space left on device")

        rundir.atomic_write(path, write)

    monkeypatch.setattr(loop, "write_json", full)  # summary.json, after the last checkpoint
    _inject()
    assert _train(run, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert f"no space left on {run} writing {run / 'summary.json'}" in err, err
    assert "Traceback" not in err and not (run / "summary.json").exists()
    assert load_latest_intact(str(run / "checkpoints"))[0]["step"] == 1
    _survived()


def test_eval_writes_where_its_help_says_and_never_replaces_the_runs_own_result(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--steps", "2", "--ckpt-every", "1", "--keep-ckpts", "2") == 0
    ev = ["eval", "--rerank-k", "0", "--num-workers", "0", "--batch-size", "8"]
    _inject()  # a step file inside RUN/checkpoints: the result lands in RUN, not above it
    assert main([*ev, "--ckpt", str(run / "checkpoints" / "step_00000002.pt")]) == 0
    own = (run / "eval.json").read_bytes()
    assert not (tmp_path / "eval.json").exists()
    _survived()
    _inject()  # other data, another split, an older step: each its own file, eval.json kept
    for extra, name in (
        (["--ckpt", str(run), "--data", "synthetic:12:6"], "eval_synthetic-12-6.json"),
        (["--ckpt", str(run), "--split", "all"], "eval_all.json"),
        (["--ckpt", str(run / "checkpoints" / "step_00000001.pt")], "eval_step1.json"),
    ):
        assert main([*ev, *extra]) == 0, extra
        assert (run / name).exists() and (run / name.replace(".json", ".txt")).exists(), name
        assert (run / "eval.json").read_bytes() == own, extra
        assert f"wrote {run / name}" in capsys.readouterr().out
    _survived()
    _inject()  # --json into a missing folder: created; under a file: refused before evaluating
    target = tmp_path / "new" / "dir" / "r.json"
    assert main([*ev, "--ckpt", str(run), "--json", str(target)]) == 0
    assert json.loads(target.read_text())["step"] == 2
    (tmp_path / "afile").write_text("x")
    capsys.readouterr()
    assert main([*ev, "--ckpt", str(run), "--json", str(tmp_path / "afile" / "r.json")]) == 2
    out, err = capsys.readouterr()
    assert "--json" in err and "is a file" in err and "evaluating" not in out, (out, err)
    _survived()


def test_resumed_log_reads_as_one_run_and_resume_warns_only_on_a_real_change(
    tmp_path, capsys, caplog
):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _train(ref, "--steps", "4", "--log-every", "2") == 0
    assert _train(run, "--steps", "4", "--log-every", "2", "--stop-at", "3") == 0
    _inject()  # stopped between two log steps, then resumed with the same --preset / --set
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert _train(run, "--resume") == 0
    assert "ignored" not in caplog.text, caplog.text
    assert _log_losses(str(run)) == _log_losses(str(ref))
    assert [r[0] for r in _log_losses(str(run))] == [2, 4]
    _survived()
    _inject()  # a --set that differs from the checkpoint: the warning names it
    (run / "checkpoints" / "latest").write_text("step_00000003.pt\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        main(["train", *_TINY, "vision.depth=3", *_SMALL_RUN, "--out", str(run), "--resume"])
    assert "ignored" in caplog.text and "vision.depth" in caplog.text, caplog.text
    _survived()


def test_train_resume_of_a_finetuning_run_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "ret"
    argv = ["finetune", "retrieval", *_TINY, *_SMALL_RUN, "--steps", "1", "--out", str(run)]
    assert main(argv) == 0
    capsys.readouterr()
    _inject()
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "'retrieval' run" in err and "semmim finetune retrieval" in err, err
    assert "Traceback" not in err
    _survived()


def test_diagnostics_plot_labels_the_mask_overlap_references_as_the_metric_means(
    tmp_path, monkeypatch
):
    import matplotlib.axes

    from semmim.train import plot_diagnostics

    _inject()
    log_csv = tmp_path / "log.csv"
    log_csv.write_text("step,loss,diag_mask_overlap\n1,1.0,0.9\n2,1.0,0.8\n")
    (tmp_path / "config.json").write_text(
        json.dumps({"model": {"vision": {"image_size": 32, "patch_size": 16}}})
    )
    lines = []
    real = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(
        matplotlib.axes.Axes,
        "axhline",
        lambda self, y=0, *a, **k: lines.append((y, k.get("label"))) or real(self, y, *a, **k),
    )
    assert plot_diagnostics(str(log_csv), str(tmp_path / "d.png"))
    labels = dict(lines)
    assert labels[1.0].startswith("1 = random masking"), lines
    assert labels[0.5].startswith("M/P = the text decides"), lines  # round(0.5 * 4) / 4
    assert not any("M/P (random)" in (label or "") for _, label in lines)
    _survived()


def test_sigkilled_grid_takes_its_children_with_it_and_the_rerun_resumes(tmp_path):
    """SIGKILL to a --jobs 2 grid: no handler runs in the grid, yet each child run receives
    SIGTERM from the kernel (PR_SET_PDEATHSIG), checkpoints and exits; the same command then
    resumes both runs (their logs continue) and finishes the table."""
    from semmim.rundir import lock_owner

    out = tmp_path / "grid"
    cmd = [sys.executable, "-P", "-m", "semmim", "ablate", "--variants", "default,albef"]
    cmd += ["--seeds", "0", "--jobs", "2", "--steps", "100", "--log-every", "1"]
    cmd += ["--data", "synthetic:12:6", "--batch-size", "4", "--num-workers", "0"]
    cmd += ["--threads", "1", "--eval-rerank-k", "2", *_TINY[2:], "--out", str(out)]
    runs = [out / v / "seed_0" for v in ("default", "albef")]
    _inject()
    grid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until(
            lambda: all(
                (r / "log.csv").exists() and len((r / "log.csv").read_text().splitlines()) > 2
                for r in runs
            ),
            300,
            "both child runs to log steps",
        )
        children = [lock_owner(str(r)) for r in runs]
        assert all(children), children
        grid.kill()
        grid.wait(timeout=60)
        _wait_until(
            lambda: all(lock_owner(str(r)) is None for r in runs), 120, "the children to exit"
        )
    finally:
        if grid.poll() is None:
            grid.kill()
            grid.wait()
    for r in runs:  # each stopped with a checkpoint (SIGTERM), not killed mid-write
        assert list((r / "checkpoints").glob("step_*.pt")), r
        assert "SIGTERM: stopping after step" in (r / "ablate_run.log").read_text()
    done = subprocess.run(cmd, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    report = json.load(open(out / "ablation.json"))
    assert len(report["runs"]) == 2 and report["pending"] == []
    for r in runs:
        steps = [ln.split(",")[0] for ln in (r / "log.csv").read_text().splitlines()[1:]]
        assert steps == [str(s) for s in range(1, 101)], steps  # continued where it stopped
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
    from run_helpers import open_data_peak

    source, peak = open_data_peak(f"wds-map:{path}")
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
