"""How many Triton kernels the GPU check compiles, and what they cost on sm_90, without a GPU.

The launches of the GPU check's smoke tier (tests/conftest.py CUDA_SMOKE: the cuda
tests at the model's shapes, one dtype each) are replayed on CPU tensors with every Triton launch
recorded instead of run (tests/triton_specs.py: the cache key Triton's own binder computes for an
sm_90 target); the distinct keys are the compiles of a cold cache, bounded here (slow tier;
the default tier checks that sizes alone make no new variant). Slow tier too:
every (kernel, config) the launchers can pick, over the whole range of shapes their tile tables
distinguish, compiles for sm_90 without register spills and within its shared memory.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections import Counter

import pytest
import torch

import semmim.kernels as K
from semmim.kernels._common import interpret_mode, triton_import_error

# the op modules (the package's names of the same spelling are the public functions)
ca = importlib.import_module("semmim.kernels.cross_attention")
mg = importlib.import_module("semmim.kernels.masked_gather")
pce = importlib.import_module("semmim.kernels.prototype_cross_entropy")
tm = importlib.import_module("semmim.kernels.topk_mask")

pytestmark = [
    pytest.mark.skipif(triton_import_error() != "", reason="triton is not importable"),
    pytest.mark.skipif(
        interpret_mode(), reason="records compiled launches: TRITON_INTERPRET unset"
    ),
]

SMOKE_COMPILE_BUDGET = 60
BF16 = torch.bfloat16


def _backward(out, *inputs):
    grads = [t for t in inputs if t is not None and t.requires_grad]
    torch.autograd.grad(out.float().sum(), grads, allow_unused=True)


def _topk(patch, text, M, **kw):
    # the launch is recorded, not run: the op then reads an unset non-finite flag and may raise
    with contextlib.suppress(ValueError):
        K.topk_mask(patch, text, M, backend="triton", **kw)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def smoke_launches() -> list[dict]:
    """The Triton launches of the smoke tier's tests (their shapes, dtype and calls), recorded."""
    from test_gpu_path import Trainer, make_batch, make_model
    from triton_specs import record_launches, triton_on_cpu

    with triton_on_cpu(), record_launches() as launches:
        # masked_gather (B=4, P=196, D=768, R=98, bf16, int64 index): gather and scatter-fill
        # with a positional table, forward and backward
        B, P, D, R = 4, 196, 768, 98
        idx = torch.stack([torch.randperm(P)[:R] for _ in range(B)])
        x, pos = _leaf(torch.randn(B, P, D, dtype=BF16)), _leaf(torch.randn(P, D, dtype=BF16))
        _backward(K.masked_gather(x, idx, pos, backend="triton"), x, pos)
        y, fill = _leaf(torch.randn(B, R, D, dtype=BF16)), _leaf(torch.randn(D, dtype=BF16))
        pos = _leaf(pos)
        _backward(K.masked_scatter_fill(y, idx, fill, P, pos, backend="triton"), y, fill, pos)
        # topk_mask (B=4, P=196, d=256, bf16): every M of the test, with and without noise
        patch, text = torch.randn(B, P, 256, dtype=BF16), torch.randn(B, 256, dtype=BF16)
        noise = K.gumbel_noise((B, P), seed=0, device="cpu")
        for M in sorted({1, P // 2, P - 1}):
            for nz in (None, noise):
                _topk(patch, text, M, noise=nz, tau=0.3)
        # cross_attention: the smoke cases (bf16, Dh=64), forward and backward
        for B_, Lq, Lk, H, masked in ((2, 300, 260, 2, True), (3, 40, 197, 4, False),
                                      (3, 577, 40, 4, True)):  # fmt: skip
            q, k, v = (_leaf(torch.randn(B_, L, H, 64, dtype=BF16)) for L in (Lq, Lk, Lk))
            mask = torch.ones(B_, Lk, dtype=torch.bool) if masked else None
            if masked:
                mask[-1, Lk // 2 :] = False
            _backward(K.cross_attention(q, k, v, mask, backend="triton"), q, k, v)
        # prototype_cross_entropy (N=392, E=256, K=8192, bf16), grads of z and the prototypes
        N, E, Kp = 392, 256, 8192
        z, w = _leaf(torch.randn(N, E, dtype=BF16)), _leaf(torch.randn(Kp, E, dtype=BF16))
        zt, wt, c = torch.randn(N, E, dtype=BF16), torch.randn(Kp, E, dtype=BF16), torch.zeros(Kp)
        loss, _ = K.prototype_cross_entropy(z, zt, w, wt, c, 0.1, 0.04, backend="triton")
        _backward(loss, z, w)
    # the model tests (tiny at 32 px, fp32 and bf16 autocast steps): on a GPU, cross-attention
    # and the prototype loss dispatch to Triton; topk_mask and masked_gather to the CUDA
    # extension, so here they run on their CPU backends
    with triton_on_cpu("cross_attention", "prototype_cross_entropy"), record_launches() as model:
        for amp in (None, torch.bfloat16):
            m = make_model({"mim.drop_tokens": True})
            trainer = Trainer(m, amp=amp)
            batch = make_batch(m)
            for i in range(2):
                trainer.step(batch, check_inputs=i == 0)
    return launches + model


def _table(variants: dict) -> str:
    per = Counter(k for k, _ in variants)
    return ", ".join(f"{k} {n}" for k, n in sorted(per.items()))


@pytest.mark.slow  # ~40 s on 2 cores: four tiny-model training steps dominate
def test_smoke_tier_compiles_few_triton_variants():
    """The smoke tier compiles at most SMOKE_COMPILE_BUDGET distinct Triton kernels on an H100;
    each kernel's variants differ only in what the launchers choose (dtype, tiles, flags), not
    in batch or sequence sizes."""
    from triton_specs import distinct

    launches = smoke_launches()
    variants = distinct(launches)
    print(f"\n{len(launches)} launches, {len(variants)} distinct compiles: {_table(variants)}")
    assert {x["kernel"] for x in launches} >= {
        "_masked_gather_fwd_kernel", "_masked_scatter_fill_fwd_kernel", "_masked_gather_bwd_kernel",
        "_topk_mask_fwd_kernel", "_cross_attention_fwd_kernel", "_cross_attention_bwd_dq_kernel",
        "_pce_fwd_kernel", "_pce_bwd_dz_kernel", "_pce_bwd_dw_kernel",
    }  # fmt: skip
    assert len(variants) <= SMOKE_COMPILE_BUDGET, _table(variants)


def test_sizes_do_not_make_new_variants():
    """Two batches and sequence lengths that differ in "== 1" and "% 16" patterns (and in the
    row counts of every op) but pick the same tiles share one compiled kernel per launch."""
    from triton_specs import distinct, record_launches, triton_on_cpu

    def launches(B, L):
        with triton_on_cpu(), record_launches() as rec:
            q, k, v = (_leaf(torch.randn(B, n, 2, 64, dtype=BF16)) for n in (L, L + 1, L + 1))
            _backward(K.cross_attention(q, k, v, None, backend="triton"), q, k, v)
            z, w = _leaf(torch.randn(B * L, 64, dtype=BF16)), _leaf(torch.randn(L, 64, dtype=BF16))
            zt, wt = torch.randn(B * L, 64, dtype=BF16), torch.randn(L, 64, dtype=BF16)
            loss, _ = K.prototype_cross_entropy(z, zt, w, wt, torch.zeros(L), 0.1, 0.04,
                                                backend="triton")  # fmt: skip
            _backward(loss, z, w)
            x = _leaf(torch.randn(B, L, 64, dtype=BF16))
            idx = torch.stack([torch.randperm(L)[: L // 2] for _ in range(B)])
            _backward(K.masked_gather(x, idx, None, backend="triton"), x)
            _topk(torch.randn(B, L, 64, dtype=BF16), torch.randn(B, 64), L // 3)
        return rec

    one, other = launches(1, 33), launches(16, 48)  # 33 = 1 mod 16, 48 = 0 mod 16; tiles alike
    assert len(one) == len(other) > 0
    assert set(distinct(one)) == set(distinct(other)), _table(distinct(one + other))


# ------------------------------------------------------------------ every config, sm_90


def config_launches(op: str) -> list[dict]:
    """One recorded launch per (kernel, config) the launchers of ``op`` can pick: every
    tile-table row, fp32 and bf16 (fp16 takes bf16's tiles and instructions), the flags that
    change the code (noise, positional table, fill); cross-attention with a key mask (the mask
    adds registers to the unmasked code)."""
    from triton_specs import record_launches, triton_on_cpu

    dtypes = (torch.float32, BF16)
    with triton_on_cpu(), record_launches() as rec:
        if op == "cross_attention":
            # tiles depend on next_pow2(L) clamped to 16..128 (and L > 128), BLOCK_D, dtype,
            # the backward plan
            lengths = (16, 32, 64, 128, 256)
            for dtype in dtypes:
                for dh in ca.TRITON_HEAD_DIMS:
                    for lq in lengths:
                        for lk in lengths:
                            q, k, v = (torch.randn(2, n, 2, dh, dtype=dtype) for n in (lq, lk, lk))
                            mask = torch.ones(2, lk, dtype=torch.bool)
                            out, lse = ca._fwd_impl(q, k, v, mask, dh**-0.5)
                            plans = ["general"]
                            if dtype != torch.float32:
                                plans += ["short_k"] * (lk <= 128) + ["short_q"] * (lq <= 64)
                            for plan in plans:
                                ca._bwd_impl(out, q, k, v, mask, out, lse, dh**-0.5, plan=plan)
        elif op == "prototype_cross_entropy":
            impl = pce._TritonImpl()  # tiles depend on next_pow2(E) and dtype
            for dtype in dtypes:
                for E in (16, 32, 64, 128, 256, 512):
                    z, w = torch.randn(64, E, dtype=dtype), torch.randn(128, E, dtype=dtype)
                    c = torch.zeros(128)
                    ts, tt = torch.tensor(0.1), torch.tensor(0.04)  # the kernels read 0-d temps
                    loss, ls, lt = impl.forward(z, z, w, w, c, ts, tt)
                    impl.backward(loss, z, z, w, w, c, ls, lt, ts, tt, True, True)
        elif op == "topk_mask":
            for dtype in dtypes:  # tiles depend on next_pow2(P) up to 1024 and on d
                for P in (16, 32, 64, 128, 256, 512, 1024):
                    for d in (8, 1024):
                        patch, text = torch.randn(2, P, d, dtype=dtype), torch.randn(2, d)
                        tm._run_triton(patch, text, P // 2, torch.randn(2, P), 0.5)
        else:
            kern = mg._TritonKernels()  # tiles depend on next_pow2(D): rows up to 256, 128
            for dtype in dtypes:
                for D in (1, 8, 64, 128, 256, 512):
                    x, pos = torch.randn(2, 8, D, dtype=dtype), torch.randn(8, D, dtype=dtype)
                    idx = torch.arange(4).expand(2, 4).contiguous()
                    kern.gather_rows(x, idx, pos)
                    inv = kern.inverse(idx, 8)
                    y, fill = torch.randn(2, 4, D, dtype=dtype), torch.randn(D, dtype=dtype)
                    kern.scatter_rows(y, inv, fill, pos)
                    kern.partials(y, inv, True, True, True, False)
                    kern.partials(x, inv, False, False, True, True)
    return rec


@pytest.mark.slow
@pytest.mark.parametrize(
    "op", ["prototype_cross_entropy", "cross_attention", "topk_mask", "masked_gather"]
)
def test_every_launcher_config_compiles_for_sm90_without_spills(op):
    """Every (kernel, config) the launchers can pick compiles for an H100 (sm_90, ptxas from the
    Triton wheel) with no register spills and within its 227 KB of shared memory per block.
    SEMMIM_SM90_REPORT=path appends the resource table (kernel, config, registers, spill, smem)."""
    from triton_specs import compile_sm90, distinct

    variants = distinct(config_launches(op))
    rows, bad = [], []
    report = os.environ.get("SEMMIM_SM90_REPORT")
    with open(report or os.devnull, "a") as log:
        for (name, _), launch in sorted(variants.items(), key=lambda kv: kv[0]):
            try:
                usage = compile_sm90(launch)
            except RuntimeError as e:  # no ptxas in this triton build
                if "ptxas" in str(e).lower():
                    pytest.skip(f"no ptxas: {e}")
                raise
            names = launch["fn"].arg_names
            consts = {
                names[k[0]]: v
                for k, v in launch["constexprs"].items()
                if names[k[0]].isupper() or names[k[0]] == "Dh"
            }
            desc = f"{name} {launch['dtypes'][0]} {consts} {launch['options']}"
            rows.append(
                f"{desc}: regs {usage['regs']} spill {usage['spill']} smem {usage['shared']}"
            )
            print(rows[-1], file=log, flush=True)
            if usage["spill"] not in (0, None) or usage["shared"] > 227 * 1024:
                bad.append(rows[-1])
    assert not bad, f"{len(bad)} of {len(rows)} configs spill or overflow:\n" + "\n".join(bad)
