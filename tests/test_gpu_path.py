"""The training step as a GPU runs it, proven as far as CPU allows (issue 9).

- ``cfg.kernels`` (KernelsConfig): validated, round-trips, reaches every op call.
- Mixed precision: a whole training step (forward, backward, clip, AdamW, scheduler, EMA) under
  CPU bf16 autocast for every ablation and both masked-image paths, against the fp32 step from
  the same init and seed; the logits' softmax / log-softmax / L2-normalisation run in fp32.
- No host reads: steps 2..n of a training loop call nothing that reads a tensor value on the
  host (each would be a device→host sync on a GPU).
- torch.compile: a compiled training step matches eager (graph breaks listed below).
- interpret tier: the tiny model with every op on triton vs the reference backends.
- cuda tier: the same steps under CUDA autocast (bf16; fp16 with a GradScaler) and under
  ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import semmim.kernels as K
from semmim import SemMIM, SemMIMConfig, build_model, from_preset
from semmim.config import KernelsConfig
from semmim.layers import PrototypeHead

ROOT = Path(__file__).resolve().parents[1]
SMALL_IMAGES = {"vision.image_size": 32}  # P = 4 patches: the step takes ~0.3 s on one core

ABLATIONS = [
    {},
    {"mim.target": "pixel"},
    {"mim.text_in_target": False},
    {"masking.strategy": "random"},
    {"mim.enabled": False},
    {"mim.psi": "text_cls"},
    # issue 17's switches
    {"mim.psi_scale": 0.5, "mim.psi_max_ratio": 0.5},
    {"mim.text_grad": False},
    {"glob.views": "cross"},
    {"masking.score": "patch"},
]
# every ablation on both masked-image paths (mim.enabled=False has no masked image: once)
CASES = [
    {**a, "mim.drop_tokens": drop}
    for a in ABLATIONS
    for drop in (True, False)
    if not (a.get("mim.enabled") is False and not drop)
] + [  # the one-pass student (issue 18): token dropping only
    {**a, "mim.student_view": "masked"}
    for a in (
        {},
        {"mim.target": "pixel"},
        {"mim.enabled": False},
        {"masking.ratio": 0.75},
        {"mim.unmasked_from": 0.2},  # the Trainer's 10 steps: the full image from step 3 on
    )
]
CASE_IDS = [",".join(f"{k}={v}" for k, v in c.items()) for c in CASES]


def make_batch(model: SemMIM, B: int = 4, seed: int = 0, device: str = "cpu"):
    words = ["red square", "green circle on grass", "blue sky", "yellow cat"] * 2
    enc = model.tokenizer([f"a photo of a {w}" for w in words[:B]], padding=True)
    S = model.cfg.vision.image_size
    images = torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(seed))
    ids = torch.tensor(enc["input_ids"])
    am = torch.tensor(enc["attention_mask"])
    return images.to(device), ids.to(device), am.to(device)


def make_model(overrides: dict, device: str = "cpu", seed: int = 0) -> SemMIM:
    torch.manual_seed(seed)
    return build_model(from_preset("tiny", {**SMALL_IMAGES, **overrides})).to(device)


class Trainer:
    """The hand-written loop the issue describes: forward (explicit seed), backward,
    clip_grad_norm_, AdamW, LR scheduler, EMA.

    AdamW runs with ``fused=True``: the default (foreach, not capturable) implementation keeps
    each ``step`` counter as a CPU tensor and reads it on the host every step (``.item()``
    for the bias correction); the fused kernel (CPU and CUDA) keeps the step on the params'
    device and takes lr as a float, so an optimizer step reads nothing back.
    """

    def __init__(
        self,
        model: SemMIM,
        steps: int = 10,
        amp: torch.dtype | None = None,
        sgd: bool = False,
        image_ids: torch.Tensor | None = None,
    ):
        self.model, self.steps, self.amp = model, steps, amp
        self.image_ids = image_ids  # as the training loop passes them (batch + queue positives)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if sgd:  # for comparisons: Adam's first steps turn a 1e-9 gradient into a full lr step
            self.opt = torch.optim.SGD(self.params, lr=0.05, momentum=0.9)
        else:
            self.opt = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.05, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps))
        )
        self.scaler = None
        self.step_count = 0

    def step(self, batch, *, check_inputs: bool, forward=None):
        model = self.model
        device_type = batch[0].device.type
        model.set_step(self.step_count, self.steps)
        with torch.autocast(device_type, dtype=self.amp or torch.float32, enabled=bool(self.amp)):
            out = (model if forward is None else forward)(
                *batch,
                seed=1000 + self.step_count,
                check_inputs=check_inputs,
                image_ids=self.image_ids,
            )
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(out.loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
        self.sched.step()
        model.update_momentum()
        self.step_count += 1
        return out


def loss_bound(reference: float) -> float:
    """|loss(bf16 autocast) − loss(fp32)| allowed for a tiny-model loss (stated in the issue
    note): 1% of the loss + 0.02. Measured on CPU: at most 0.012 (ITC, value 4.8)."""
    return 0.01 * abs(reference) + 0.02


# ---------------------------------------------------------------- KernelsConfig


def test_kernels_config_defaults_round_trip_and_override():
    cfg = from_preset("tiny")
    assert cfg.kernels == KernelsConfig()
    assert cfg.kernels.backend == "auto" and cfg.kernels.validate is True
    assert SemMIMConfig.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    del old["kernels"]  # a checkpoint written before the section existed
    assert SemMIMConfig.from_dict(old).kernels == KernelsConfig()
    c2 = cfg.override({"kernels.backend": "reference", "kernels.cross_attention": "sdpa"})
    assert c2.kernels.backend_for("masked_gather") == "reference"
    assert c2.kernels.backend_for("cross_attention") == "sdpa"
    assert SemMIMConfig.from_dict(c2.to_dict()) == c2
    # a global backend an op does not have: that op dispatches automatically (as SEMMIM_BACKEND)
    c3 = cfg.override({"kernels.backend": "sdpa"})
    assert c3.kernels.backend_for("cross_attention") == "sdpa"
    assert c3.kernels.backend_for("masked_gather") is None
    assert KernelsConfig().backend_for("topk_mask") is None


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("kernels.backend", "trition", r"kernels\.backend: unknown backend 'trition'.*reference"),
        ("kernels.masked_gather", "sdpa", r"kernels\.masked_gather: unknown backend 'sdpa'"),
        ("kernels.cross_attention", "cuda", r"kernels\.cross_attention: .*'cuda'.*'sdpa'"),
        ("kernels.validate", "no", r"kernels\.validate: expected bool"),
        ("kernels.backend", 3, r"kernels\.backend: expected str"),
    ],
)
def test_kernels_config_rejects_bad_values(key, value, match):
    with pytest.raises(ValueError, match=match):
        from_preset("tiny", {key: value})


def test_ops_get_the_configured_backend_and_validate_flag(monkeypatch):
    """Every op call of a training forward carries ``backend=`` from cfg.kernels and
    ``validate=`` (False with check_inputs=False); the EMA copy shares the model's OpCalls."""
    model = make_model({"kernels.backend": "reference"})
    assert model.ops is model.net.vision.ops is model.ema.vision.ops
    assert model.net.fusion.layers[0].cross.ops is model.ops
    assert model.ema.predictor.blocks[0].cross.ops is model.ops
    calls = []
    every = ["masked_gather", "masked_scatter_fill", "topk_mask", "cross_attention",
             "prototype_cross_entropy"]  # fmt: skip
    for name in every:
        real = getattr(K, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs.get("backend"), kwargs.get("validate")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(K, name, spy)
    batch = make_batch(model)
    model(*batch, seed=0)
    ops = {c[0] for c in calls}
    assert ops == set(every)
    assert all(c[1] == "reference" and c[2] is True for c in calls), calls
    n = len(calls)
    model(*batch, seed=0, check_inputs=False)
    assert len(calls) == 2 * n and all(c[2] is False for c in calls[n:]), calls[n:]
    assert model.ops.validate is True  # restored after the call
    model.ops.validate = True


def test_record_dispatch_sees_the_configured_backends():
    model = make_model({"kernels.backend": "reference", "kernels.cross_attention": "sdpa"})
    with K.record_dispatch() as ran:
        model(*make_batch(model), seed=0)
    assert ran == {
        "masked_gather": {"reference"},
        "masked_scatter_fill": {"reference"},
        "topk_mask": {"reference"},
        "cross_attention": {"sdpa"},
        "prototype_cross_entropy": {"reference"},
    }


def test_check_inputs_false_still_checks_shapes():
    model = make_model({})
    images, ids, am = make_batch(model)
    with pytest.raises(ValueError, match="attention_mask"):
        model(images, ids, am[:, :-1], seed=0, check_inputs=False)
    with pytest.raises(ValueError, match="images"):
        model(images[..., :16, :16], ids, am, seed=0, check_inputs=False)


# ---------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("overrides", CASES, ids=CASE_IDS)
def test_bf16_autocast_training_step_matches_fp32(overrides):
    """Two full training steps from the same init and seeds, fp32 and under CPU bf16
    autocast: every loss finite and within :func:`loss_bound` of the fp32 one; the parameters
    and EMA stay finite and float32."""
    results = {}
    for amp in (None, torch.bfloat16):
        model = make_model(overrides)
        trainer = Trainer(model, amp=amp)
        batch = make_batch(model)
        results[amp] = [
            {
                k: float(v.detach())
                for k, v in trainer.step(batch, check_inputs=i == 0).losses.items()
            }
            for i in range(2)
        ]
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
    for step, (l32, l16) in enumerate(zip(results[None], results[torch.bfloat16])):
        assert l32.keys() == l16.keys()
        for k in l32:
            assert math.isfinite(l16[k]), (step, k)
            assert abs(l16[k] - l32[k]) <= loss_bound(l32[k]), (step, k, l32[k], l16[k])


def test_prototype_logits_are_fp32_of_the_bf16_features():
    """Under autocast the head's MLP runs in bf16 and its cosine logits are computed in fp32
    from the MLP's bf16 output (not rounded to bf16 before the softmax)."""
    torch.manual_seed(0)
    head = PrototypeHead(64, 128, 32, 100)
    x = torch.randn(3, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = head.mlp(x)
        logits = head(x)
    assert h.dtype == torch.bfloat16 and logits.dtype == torch.float32
    expected = F.normalize(h.float(), dim=-1) @ F.normalize(head.prototypes, dim=-1).T
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert not torch.equal(logits, logits.bfloat16().float())  # really not rounded to bf16


@pytest.mark.parametrize("overrides", [{}, {"mim.drop_tokens": False}], ids=["drop", "mask"])
def test_softmax_and_normalise_inputs_are_fp32_under_autocast(monkeypatch, overrides):
    """Every softmax / log-softmax / L2-normalise / cross-entropy the model's losses call gets
    float32 input under bf16 autocast (checked by spying on torch.nn.functional)."""
    seen = []
    for name in ["softmax", "log_softmax", "normalize", "cross_entropy"]:
        real = getattr(F, name)

        def spy(x, *args, _real=real, _name=name, **kwargs):
            seen.append((_name, x.dtype, "".join(traceback.format_stack(limit=3)[:1])))
            return _real(x, *args, **kwargs)

        monkeypatch.setattr(F, name, spy)
    model = make_model({**overrides, "kernels.cross_attention": "sdpa"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*make_batch(model), seed=0)
    out.loss.backward()
    names = {s[0] for s in seen}
    assert {"softmax", "log_softmax", "normalize", "cross_entropy"} <= names
    bad = [s for s in seen if s[1] != torch.float32]
    assert not bad, bad


# ---------------------------------------------------------------- host reads

_SYNC_ATEN = {
    "aten::_local_scalar_dense",  # item(), bool(), int(), float() at the dispatcher level
    "aten::nonzero",
    "aten::masked_select",
    "aten::equal",
    "aten::is_nonzero",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::allclose",
}


class _AtenSyncs(TorchDispatchMode):
    """Counts aten ops whose result depends on tensor values read on the host: the scalar
    reads above, data-dependent output sizes, boolean-mask indexing, repeat_interleave
    without output_size."""

    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        bool_index = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
            for t in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])
        )
        if (
            name in _SYNC_ATEN
            or bool_index
            or (name == "aten::repeat_interleave" and kwargs.get("output_size") is None)
        ):
            self.record.append((name, "".join(traceback.format_stack(limit=8)[:-1])))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_reads():
    """Yields a list that collects (what, stack) for every host read of a tensor value:
    Python-level reads (item, tolist, bool/int/float/index conversion, nonzero, numpy,
    torch.equal/allclose, ...) by patching them, and aten-level ones by a dispatch mode."""
    record: list[tuple[str, str]] = []
    patched = []

    def wrap(owner, name):
        real = getattr(owner, name)

        def counting(*args, **kwargs):
            record.append((f"{getattr(owner, '__name__', owner)}.{name}", _stack()))
            return real(*args, **kwargs)

        patched.append((owner, name, real))
        setattr(owner, name, counting)

    def _stack():
        return "".join(traceback.format_stack(limit=8)[:-2])

    for name in [
        "item",
        "tolist",
        "__bool__",
        "__int__",
        "__float__",
        "__index__",
        "__complex__",
        "nonzero",
        "numpy",
        "unique",
        "equal",
        "allclose",
    ]:
        wrap(torch.Tensor, name)
    for name in ["nonzero", "equal", "allclose", "unique", "is_nonzero", "masked_select"]:
        wrap(torch, name)
    try:
        with _AtenSyncs(record):
            yield record
    finally:
        for owner, name, real in reversed(patched):
            setattr(owner, name, real)


def test_host_read_counter_counts():
    """The counter itself: each kind of read is seen (so a zero below means something)."""
    x = torch.arange(6.0)
    reads = [
        lambda: x.sum().item(),
        lambda: x.tolist(),
        lambda: bool(x[0]),
        lambda: int(x[1]),
        lambda: float(x[2]),
        lambda: x.nonzero(),
        lambda: torch.nonzero(x),
        lambda: x[x > 2],
        lambda: torch.equal(x, x),
        lambda: x.unique(),
        lambda: range(10)[x[1].long()],
        lambda: torch.repeat_interleave(x.long()),
    ]
    for read in reads:
        with count_host_reads() as rec:
            read()
        assert rec, read
    with count_host_reads() as rec:
        (x * 2).sum(), x.argsort(), x.topk(2)
    assert rec == []


@pytest.mark.parametrize("overrides", CASES, ids=CASE_IDS)
def test_no_host_reads_in_training_steps_after_the_first(overrides):
    """Step 1 validates (check_inputs=True); steps 2 and 3 read no tensor value on the host:
    forward (explicit seed, check_inputs=False), backward, clip_grad_norm_, fused AdamW,
    scheduler, EMA update."""
    model = make_model(overrides)
    trainer = Trainer(model)
    batch = make_batch(model)
    trainer.step(batch, check_inputs=True)
    with count_host_reads() as reads:
        for _ in range(2):
            trainer.step(batch, check_inputs=False)
    assert reads == [], f"{len(reads)} host read(s); first: {reads[0][0]}\n{reads[0][1]}"


def test_no_host_reads_with_image_ids_and_in_downstream_models():
    """Pre-training passes image ids (batch and queue positives); the VQA and caption models'
    forward(check_inputs=False) + backward read no tensor value either (their ops get
    validate=False like SemMIM's)."""
    from semmim.downstream.models import CaptionModel, VQAModel

    model = make_model({})
    images, ids, mask = make_batch(model)
    image_ids = torch.tensor([5, 5, 2, 9])
    model(images, ids, mask, seed=0, image_ids=image_ids)  # fills part of the queue with ids
    with count_host_reads() as reads:
        model(images, ids, mask, seed=1, check_inputs=False, image_ids=image_ids).loss.backward()
    assert reads == [], f"{len(reads)} host read(s); first: {reads[0][0]}\n{reads[0][1]}"
    cfg = model.cfg
    for down, kwargs in (
        (VQAModel(cfg, 7), {"targets": torch.rand(4, 7)}),
        (CaptionModel(cfg), {}),
    ):
        down(images, ids, mask, seed=0, check_inputs=True, **kwargs)
        with count_host_reads() as reads:
            loss, _ = down(images, ids, mask, seed=0, check_inputs=False, **kwargs)
            loss.backward()
        assert reads == [], f"{type(down).__name__}: {reads[0][0]}\n{reads[0][1]}"
        assert down.ops.validate == down.ops.configured  # restored


# ---------------------------------------------------------------- torch.compile
# Graph breaks that remain (torch._dynamo.explain on the default tiny forward, torch 2.13): 13
# in 14 graphs, all from the explicit torch.Generator RNG (ITM negatives, MLM masking, the
# mask noise): dynamo cannot put a Generator in a graph. Table with reasons: docs/GPU_PATH.md.

# one layer per tower: Inductor's C++ build time grows with the graph, the graph with depth
COMPILE_MODEL = {"vision.depth": 1, "text.depth": 1, "fusion.depth": 1}
STEPS = 3


def _close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    err, scale = float((a - b).abs().max()), float(b.abs().max())
    assert err <= rel * scale + 1e-6, f"{what}: max|diff| {err:.3g}, max|ref| {scale:.3g}"


def _eager_vs_compiled(backend: str, overrides: dict | None = None) -> dict:
    """STEPS training steps (SGD with momentum: Adam's first steps would turn rounding
    differences of near-zero gradients into full lr steps) of an eager model and of an
    identical copy under ``torch.compile(backend=...)``, same seeds. Returns each side's
    per-step losses, step-0 gradients, final parameters and buffers."""
    eager = make_model({**COMPILE_MODEL, **(overrides or {})})
    twin = copy.deepcopy(eager)  # one deepcopy call: net and ema of the twin share its ops
    assert twin.ops is twin.ema.vision.ops is not eager.ops
    compiled = torch.compile(twin, backend=backend)
    batch = make_batch(eager)
    result = {}
    # image ids as the loop passes them: pairs 0 and 1 show one image, and from step 2 on
    # the queue holds this batch's ids (queued positives)
    image_ids = torch.tensor([0, 0, 1, 2])
    for name, model, fwd in (("eager", eager, None), ("compiled", twin, compiled)):
        trainer = Trainer(model, sgd=True, image_ids=image_ids)
        losses, grads = [], None
        for i in range(STEPS):
            out = trainer.step(batch, check_inputs=False, forward=fwd)
            losses.append({k: v.detach() for k, v in out.losses.items()})
            if i == 0:
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        result[name] = {
            "losses": losses,
            "grads": grads,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()},
        }
    return result


class CompileCounter:
    """A torch.compile backend that counts the graphs Dynamo hands it (one per compiled frame
    or resumed segment, recompilations included) and runs them with ``aot_eager`` (AOTAutograd
    and functionalisation, no Inductor C++ build)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def test_compiled_training_step_does_not_recompile_as_schedules_move():
    """12 compiled training steps (aot_eager) while every schedule moves each step (the MIM
    teacher temperature warm-up and α's warm-up over the whole run, cosine momentum): the first
    step compiles, the second once more (the seed turns into a dynamic int), then nothing.
    Each schedule value a forward reads must be an input tensor (the model's 0-d buffers), not a
    Python float Dynamo guards on (that recompiled `_mim_loss` every step up to the limit)."""
    overrides = {
        **COMPILE_MODEL,
        "mim.teacher_temp_warmup": 1.0,
        "itc.alpha_warmup": 1.0,
        "momentum.schedule": "cosine",
    }
    model = make_model(overrides)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    trainer = Trainer(model, steps=12, sgd=True)
    batch = make_batch(model)
    per_step, temps = [], []
    for _ in range(12):
        before = counter.graphs
        trainer.step(batch, check_inputs=False, forward=compiled)
        per_step.append(counter.graphs - before)
        temps.append(model.mim_teacher_temp)
    assert len(set(temps)) == 12, temps  # the schedule did move every step
    assert per_step[0] > 0 and sum(per_step[2:]) == 0, f"graphs compiled per step: {per_step}"


@pytest.fixture(scope="module")
def inductor_run():
    """One Inductor compile per test module (minutes on 2 CPU cores)."""
    return _eager_vs_compiled("inductor")


@pytest.mark.slow
def test_aot_eager_training_step_matches_eager():
    """torch.compile's graph capture and AOTAutograd (functionalisation: the fill_diagonal_ on
    a view that used to fail, buffer mutations of the queue and centres) on STEPS training
    steps: losses, step-0 gradients, final parameters and buffers within 1e-4 of each
    tensor's largest magnitude of eager (measured: equal to ~1e-7)."""
    r = _eager_vs_compiled("aot_eager")
    e, c = r["eager"], r["compiled"]
    for i, (le, lc) in enumerate(zip(e["losses"], c["losses"])):
        assert le.keys() == lc.keys()
        for k in le:
            _close(lc[k], le[k], 1e-4, f"step {i} loss {k}")
    for what in ("grads", "params", "buffers"):
        for n, t in e[what].items():
            _close(c[what][n].float(), t.float(), 1e-4, f"{what} {n}")


# issue 17's switches, all at once (one aot_eager compile)
NEW_SWITCHES = {
    "mim.psi_scale": 0.5,
    "mim.psi_max_ratio": 0.5,
    "mim.text_grad": False,
    "glob.views": "cross",
    "masking.score": "patch",
}


def test_compiled_training_step_with_the_new_switches_matches_eager():
    """ψ bound, MIM stop-gradient into the text, cross-view global agreement and the patch
    score + patch loss under torch.compile (aot_eager): STEPS steps' losses, the step-0
    gradients and the final parameters as eager's."""
    torch._dynamo.reset()
    r = _eager_vs_compiled("aot_eager", NEW_SWITCHES)
    e, c = r["eager"], r["compiled"]
    assert "patch" in e["losses"][0]
    for i, (le, lc) in enumerate(zip(e["losses"], c["losses"])):
        assert le.keys() == lc.keys()
        for k in le:
            _close(lc[k], le[k], 1e-4, f"step {i} loss {k}")
    for what in ("grads", "params"):
        for n, t in e[what].items():
            _close(c[what][n].float(), t.float(), 1e-4, f"{what} {n}")


def test_compiled_diagnostic_step_runs_the_per_objective_gradients_without_host_reads():
    """A diagnostic step through a compiled forward (aot_eager): the per-objective
    ``autograd.grad`` passes (retain_graph) and then the step's own backward, no host read;
    the gradients equal those of a step without diagnostics."""
    from semmim.train.task import Task

    torch._dynamo.reset()
    model = make_model({**COMPILE_MODEL, **NEW_SWITCHES})
    twin = copy.deepcopy(model)
    images, ids, am = make_batch(model)
    batch = {"images": images, "input_ids": ids, "attention_mask": am}
    batch["alpha"] = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="aot_eager")
    Task().loss(compiled, batch, "cpu", 1, False, diagnostics=True)[0].backward()  # compile
    model.zero_grad()
    twin.load_state_dict(model.state_dict())  # the same queue and centres as step 2 sees
    with count_host_reads() as reads:
        loss, parts = Task().loss(compiled, batch, "cpu", 2, False, diagnostics=True)
        loss.backward()
    assert reads == [], reads[0]
    assert parts["diag_grad_patch_vision"] > 0 and parts["diag_grad_mim_text"] == 0
    Task().loss(twin, batch, "cpu", 2, False)[0].backward()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        if p.grad is not None:
            _close(p.grad, q.grad, 1e-4, n)


@pytest.mark.slow
def test_inductor_training_step_runs_and_matches_eager_losses(inductor_run):
    """torch.compile(model) with Inductor on CPU runs STEPS training steps; at the first step
    (same weights) every loss is within 1e-4 relative of eager; every later loss is finite."""
    e, c = inductor_run["eager"], inductor_run["compiled"]
    for k, v in e["losses"][0].items():
        _close(c["losses"][0][k], v, 1e-4, f"step 0 loss {k}")
    for step in c["losses"]:
        assert all(torch.isfinite(v) for v in step.values()), step


@pytest.mark.slow
def test_inductor_gradients_match_eager(inductor_run):
    """The first step's gradients under Inductor equal eager's within 1e-4 of each tensor's
    largest magnitude. (They differed by up to ~40% while the prototype op's backward read the
    centre buffer that the forward updates in place: Inductor's partitioner recomputed from the
    mutated buffer. The op now saves its own copy; see kernels/prototype_cross_entropy.py.)"""
    e, c = inductor_run["eager"], inductor_run["compiled"]
    for n, g in e["grads"].items():
        _close(c["grads"][n], g, 1e-4, f"grad {n}")


# ---------------------------------------------------------------- interpret tier


def _losses_and_grads(backend: str, dtype: torch.dtype):
    model = make_model({"kernels.backend": backend}).to(dtype)
    images, ids, am = make_batch(model)
    with K.record_dispatch() as ran:
        out = model(images.to(dtype), ids, am, seed=3)
        out.loss.backward()
    assert all(v == {backend} for v in ran.values()), ran
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
    return {k: float(v.detach()) for k, v in out.losses.items()}, grads


@pytest.mark.interpret
def test_tiny_model_on_triton_matches_reference_backends_fp32():
    """Forward and backward of the tiny model with every op on the triton backend (Triton's
    CPU interpreter) against the same model on the reference backends, fp32: every loss within
    1e-4 relative and every parameter gradient within 1e-4 · max|grad| + 1e-6."""
    ref_l, ref_g = _losses_and_grads("reference", torch.float32)
    tri_l, tri_g = _losses_and_grads("triton", torch.float32)
    for k, v in ref_l.items():
        assert tri_l[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    for n, g in ref_g.items():
        tol = 1e-4 * float(g.abs().max()) + 1e-6
        torch.testing.assert_close(tri_g[n], g, rtol=0, atol=tol, msg=n)


@pytest.mark.interpret
def test_tiny_model_on_triton_matches_reference_backends_fp16():
    """The same in float16 (model cast with .half(); the interpreter is exact in fp16, not in
    bf16): the triton model's error against the fp32 reference model is at most 2× the fp16
    reference model's own error for each loss and 3× for each gradient (the house rule for
    low-precision kernels), plus a floor of 1e-3 (loss) / 1e-3 · max|grad| (gradients).
    Measured: gradients within 1.9× of the fp16 reference's error."""
    l32, g32 = _losses_and_grads("reference", torch.float32)
    l16, g16 = _losses_and_grads("reference", torch.float16)
    lt, gt = _losses_and_grads("triton", torch.float16)
    for k, v in l32.items():
        assert abs(lt[k] - v) <= 2 * abs(l16[k] - v) + 1e-3, (k, v, l16[k], lt[k])
    for n, g in g32.items():
        own = float((g16[n] - g).abs().max())
        err = float((gt[n] - g).abs().max())
        assert err <= 3 * own + 1e-3 * float(g.abs().max()), (n, own, err)


# ---------------------------------------------------------------- cuda tier


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("overrides", CASES, ids=CASE_IDS)
def test_cuda_autocast_training_step(overrides, amp):
    """The same two steps on CUDA under autocast (fp16 with a GradScaler) vs the CUDA fp32
    step: losses finite and within :func:`loss_bound` (fp16: twice it)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    results = {}
    for run in (None, dtype):
        model = make_model(overrides, device="cuda")
        trainer = Trainer(model, amp=run)
        if run is torch.float16:
            trainer.scaler = torch.amp.GradScaler("cuda")
        batch = make_batch(model, device="cuda")
        results[run] = [
            {
                k: float(v.detach())
                for k, v in trainer.step(batch, check_inputs=i == 0).losses.items()
            }
            for i in range(2)
        ]
    factor = 2.0 if dtype is torch.float16 else 1.0
    for l32, low in zip(results[None], results[dtype]):
        for k in l32:
            assert math.isfinite(low[k]), k
            assert abs(low[k] - l32[k]) <= factor * loss_bound(l32[k]), (k, l32[k], low[k])


@pytest.mark.cuda
@pytest.mark.parametrize("overrides", CASES, ids=CASE_IDS)
def test_cuda_training_step_without_sync(overrides):
    """After a validating first step, a bf16 training step runs under
    ``torch.cuda.set_sync_debug_mode("error")``: any device→host sync raises."""
    model = make_model(overrides, device="cuda")
    trainer = Trainer(model, amp=torch.bfloat16)
    batch = make_batch(model, device="cuda")
    trainer.step(batch, check_inputs=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.step(batch, check_inputs=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- the GPU check script


@pytest.mark.parametrize("section", ["fast", "train"])
def test_e2e_gpu_script_stops_with_a_clear_message_without_a_gpu(tmp_path, section):
    """benchmarks/e2e_gpu.py parses its arguments, prints its plan (which builds the base
    config and counts its FLOPs) and stops at its first GPU step with exit code 3 and a
    message saying why; the table section then reports that nothing was measured."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    script = str(ROOT / "benchmarks" / "e2e_gpu.py")

    def run(*args):
        return subprocess.run(
            [sys.executable, "-P", script, "--out", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )

    proc = run("--section", section)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith("plan: base at 224 px (P=196, M=98)"), proc.stdout
    assert "e2e: no CUDA GPU on this machine" in proc.stdout, proc.stdout
    table = run("--section", "table")
    assert table.returncode == 0 and "no results" in table.stdout, table.stdout


def test_e2e_flop_count_matches_a_hand_count():
    """The analytic FLOP count of one ViT layer and the whole-step bookkeeping."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import e2e_gpu
    finally:
        sys.path.pop(0)
    L, D, Fh = 197, 768, 3072
    by_hand = 2 * L * D * 3 * D + 2 * L * L * D * 2 + 2 * L * D * D + 2 * 2 * L * D * Fh
    assert e2e_gpu._self_layer(L, D, Fh) == by_hand
    cfg = from_preset("base")
    f = e2e_gpu.train_flops(cfg, 64, 32)
    assert f["total"] == 3 * f["student_fwd"] + f["ema_fwd"]
    drop = e2e_gpu.train_flops(cfg, 64, 32)["student_fwd"]
    full = e2e_gpu.train_flops(cfg.override({"mim.drop_tokens": False}), 64, 32)["student_fwd"]
    assert full - drop == pytest.approx(
        64 * 12 * (e2e_gpu._self_layer(197, 768, 3072) - e2e_gpu._self_layer(99, 768, 3072))
    )
    # ViT-B/16 at 224 px: 17.6 G multiply-adds per image (the "17.6 GFLOPs" timm/fvcore quote),
    # i.e. 35.1 GFLOP at 2 FLOP per multiply-add
    vit = 2 * 196 * 3 * 256 * 768 + 12 * e2e_gpu._self_layer(197, 768, 3072)
    assert 2 * 17.4e9 < vit < 2 * 17.8e9


def _e2e_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import e2e_gpu
    finally:
        sys.path.pop(0)
    return e2e_gpu


def _gpu_check(*args, env=None, timeout=120):
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_gpu_check_plan_fits_the_first_call_with_the_e2e_table_first():
    """`gpu_check.sh --plan` (no GPU needed): the first call's caps sum within its 480 s budget,
    the build comes first and every end-to-end row before the training and the smoke tier; the
    budget check fails when the budget is smaller than the caps."""
    proc = _gpu_check("--plan")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [ln.split() for ln in proc.stdout.splitlines()[1:]]
    rows = [r for r in rows if len(r) > 2 and r[1].isdigit() and r[0] != "total"]
    names = [r[0] for r in rows]
    total = sum(int(r[1]) for r in rows)
    assert total <= 480 and f"total {total} s of caps; budget 480 s" in proc.stdout
    e2e = [i for i, n in enumerate(names) if n.startswith("e2e_")]
    assert names[:2] == ["device", "build"] and e2e == list(range(2, 2 + len(e2e)))
    assert {"e2e_fast", "e2e_reference", "e2e_reference_bf16", "e2e_fast_compiled"} <= set(names)
    assert max(e2e) < names.index("train_small") < names.index("smoke_tier")
    full = _gpu_check("--plan", "--full")
    assert full.returncode == 0 and "mode full" in full.stdout, full.stdout
    over = _gpu_check("--plan", env={"SEMMIM_DEADLINE_S": "300"})
    assert over.returncode == 1 and "PLAN OVER BUDGET" in over.stdout, over.stdout


def test_gpu_check_without_a_gpu_still_returns_summary_and_logs(tmp_path):
    """On a machine without CUDA the script stops after the device section with exit code 3
    and still leaves exactly summary.txt (with the commit passed in) and one tarball of logs in
    $OUT: no run directory, no checkpoint."""
    import tarfile

    out = tmp_path / "out"
    proc = _gpu_check(
        env={
            "OUT": str(out),
            "PYTHON": sys.executable,
            "SEMMIM_COMMIT": "cafe1234",
            "CUDA_VISIBLE_DEVICES": "",
        }
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check_logs.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "commit: cafe1234 (SEMMIM_COMMIT)" in summary
    assert "torch device: no CUDA GPU" in summary and "skipped: no CUDA GPU" in summary
    assert proc.stdout.rstrip().endswith("(no e2e table)"), proc.stdout[-500:]
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = tar.getnames()
    assert "./summary.txt" in names and "./device.txt" in names
    assert not [n for n in names if n.endswith((".pt", ".safetensors"))]


@pytest.mark.parametrize(
    "name,card,peak",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", "H100 NVL", 835e12),
        ("NVIDIA H200", "H200 SXM", 989e12),
        ("NVIDIA H200 NVL", "H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", None, None),
    ],
)
def test_e2e_mfu_peak_follows_the_detected_card(name, card, peak):
    got = _e2e_module().card_peak(name)
    assert got == ((card, peak) if card else None)


def test_e2e_every_allocation_failure_means_does_not_fit():
    e2e = _e2e_module()
    oom = [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("Triton Error [CUDA]: out of memory"),
    ]
    bugs = [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 4x3)"),
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        ValueError("out of memory"),  # not an allocation failure's type
    ]
    assert all(e2e.is_oom(e) for e in oom)
    assert not any(e2e.is_oom(e) for e in bugs)


def test_e2e_table_names_the_device_and_says_when_mfu_is_unknown():
    e2e = _e2e_module()
    args = argparse.Namespace(preset="base", image_size=224, tokens=32, steps=20)
    row = dict(batch=64, step_s=0.5, pairs_per_s=128.0, peak_gib=30.0, flops_per_step=1e15)
    rows = {
        "fast": dict(row, label="(a)", device="NVIDIA H100 80GB HBM3", card="H100 SXM",
                     peak_bf16=989e12, mfu=0.2),
        "reference_bf16": dict(row, label="(c')", device="NVIDIA H100 80GB HBM3",
                               card="H100 SXM", peak_bf16=989e12, mfu=0.1, pairs_per_s=64.0),
    }  # fmt: skip
    text = "\n".join(e2e.table_lines(rows, None, args))
    assert "device NVIDIA H100 80GB HBM3; MFU vs H100 SXM 989 TFLOP/s dense bf16" in text
    assert "fast / reference bf16 (same precision): 2.00x pairs/s" in text
    assert "(c) reference: reference backends, [MASK] tokens, fp32 (not measured)" in text
    # (c'') the reference compiled against (b) the fast path compiled (issue 18)
    both = {
        **rows,
        "fast_compiled": dict(rows["fast"], label="(b)", pairs_per_s=160.0),
        "reference_compiled": dict(rows["fast"], label="(c'')", pairs_per_s=80.0, batch=32),
    }
    text = "\n".join(e2e.table_lines(both, None, args))
    assert "fast / reference, both bf16 and compiled: 2.00x pairs/s (batches 64 / 32)" in text
    assert "reference_compiled" in e2e.SECTIONS and e2e.PATHS["reference_compiled"]["compile"]
    unknown = {"fast": dict(rows["fast"], device="Some GPU", card=None, peak_bf16=None, mfu=None)}
    text = "\n".join(e2e.table_lines(unknown, None, args))
    assert "card unknown: no MFU" in text and "fast MFU n/a" in text
