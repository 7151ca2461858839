"""The op contract of semmim.kernels (kernels/README.md), checked on EVERY registered op with
its own example inputs, so an op added later is covered without new tests: backend= and
validate= keywords, validate=False reads no tensor values on the host, record_dispatch, a
misspelled SEMMIM_BACKEND is an error, the info table lists the op."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
import torch

import semmim.kernels as K
from semmim.kernels import info
from semmim.kernels._common import interpret_mode
from semmim.kernels.registry import OPS

OP_NAMES = sorted(OPS)
HOST_READS = ("tolist", "item", "__int__", "__bool__", "__float__", "__index__", "nonzero")


def public(name: str):
    return getattr(K, name)


@pytest.mark.parametrize("name", OP_NAMES)
def test_public_function_takes_backend_and_validate(name):
    params = inspect.signature(public(name)).parameters
    for kw in ("backend", "validate"):
        assert kw in params and params[kw].kind is inspect.Parameter.KEYWORD_ONLY, (name, kw)
    assert params["backend"].default is None and params["validate"].default is True


@pytest.mark.parametrize("name", OP_NAMES)
def test_validate_false_reads_no_tensor_values(name, monkeypatch):
    op = OPS[name]
    args, kwargs = op.example(torch.device("cpu"))
    runnable = [b for b, why in op.reasons(*args, **kwargs).items() if not why]
    assert "reference" in runnable
    if interpret_mode():  # the Triton interpreter itself copies every tensor to the host
        runnable = [b for b in runnable if b != "triton"]
    for attr in HOST_READS:

        def read(self, *a, _attr=attr, **k):
            raise AssertionError(f"{name}: host read Tensor.{_attr} with validate=False")

        monkeypatch.setattr(torch.Tensor, attr, read)
    with K.record_dispatch() as ran:
        for b in runnable:
            public(name)(*args, **kwargs, backend=b, validate=False)
    monkeypatch.undo()
    assert ran == {name: set(runnable)}


@pytest.mark.parametrize("name", OP_NAMES)
def test_unknown_semmim_backend_is_an_error(name, monkeypatch):
    args, kwargs = OPS[name].example(torch.device("cpu"))
    monkeypatch.setenv("SEMMIM_BACKEND", "refrence")
    with pytest.raises(ValueError, match=r"SEMMIM_BACKEND must be one of .*'refrence'"):
        public(name)(*args, **kwargs)
    assert info.main([]) == 2  # the info command says the same and exits 2
    monkeypatch.setenv("SEMMIM_BACKEND", "reference")
    with K.record_dispatch() as ran:
        public(name)(*args, **kwargs)
    assert ran == {name: {"reference"}}


def test_info_names_every_op_and_its_choice(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    for name in OP_NAMES:
        assert f"{name} -> " in out, name


@pytest.mark.parametrize("name", OP_NAMES)
def test_compiles_without_graph_breaks_when_not_validating(name):
    """With validate=False the whole call (prepare, backend choice, custom op) traces into one
    graph (fullgraph=True fails on any graph break) and matches eager; record_dispatch sees the
    backend while the graph is traced."""
    args, kwargs = OPS[name].example(torch.device("cpu"))
    fn = torch.compile(
        lambda *a: public(name)(*a, **kwargs, validate=False), backend="eager", fullgraph=True
    )
    with K.record_dispatch() as ran:
        got = fn(*args)
    want = public(name)(*args, **kwargs)
    for g, w in zip(*(t if isinstance(t, tuple) else (t,) for t in (got, want))):
        assert torch.equal(g, w)
    assert set(ran) == {name}


def test_every_op_registers_exactly_its_declared_backends_in_priority_order():
    """OP_SPECS declares each op's module and backends (highest priority first); the module
    defines the op and registers exactly those, and auto-dispatch tries them in that order."""
    from semmim.kernels.registry import OP_SPECS, define_op

    for name, spec in OP_SPECS.items():
        op = OPS[name]
        assert [b.name for b in op.ordered()] == list(spec.backends), name
        assert getattr(importlib.import_module(f"semmim.kernels.{spec.module}"), name) is public(
            name
        )
    with pytest.raises(ValueError, match="not declared in semmim.kernels.registry.OP_SPECS"):
        define_op("not_an_op", prepare=lambda *a, **k: (a, k))
    with pytest.raises(ValueError, match=r"topk_mask: backend 'sdpa' is not declared"):
        OPS["topk_mask"].register("sdpa", lambda *a: None, lambda *a: [])
    assert set(OPS["topk_mask"].backends) == set(OP_SPECS["topk_mask"].backends)


def test_kernels_package_imports_an_op_module_on_first_use():
    """``import semmim.kernels`` imports no op module, torch or Triton; ``K.<op>`` is the public
    function whichever way its module was imported first (directly, through OPS, or by name)."""
    code = (
        "import importlib, sys\n"
        "import semmim.kernels as K\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch', 'triton', 'semmim.'))))\n"
        "tm = importlib.import_module('semmim.kernels.topk_mask')\n"  # directly
        "assert K.topk_mask is tm.topk_mask and K.gumbel_noise is tm.gumbel_noise\n"
        "K.get_op('cross_attention')\n"  # through the registry
        "assert callable(K.cross_attention) and K.cross_attention.__module__.endswith('attention')\n"
        "from semmim.kernels import masked_scatter_fill\n"  # by name
        "assert K.masked_gather.__name__ == 'masked_gather'\n"
        "print(sorted(n for n in K.OP_NAMES if callable(getattr(K, n))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "['semmim.config', 'semmim.kernels', 'semmim.kernels.registry']", out
    assert out[1] == str(sorted(K.OP_NAMES))
