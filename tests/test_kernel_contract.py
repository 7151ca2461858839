"""The op contract of semmim.kernels (kernels/README.md), checked on EVERY registered op with
its own example inputs, so an op added later is covered without new tests: backend= and
validate= keywords, validate=False reads no tensor values on the host, record_dispatch, a
misspelled SEMMIM_BACKEND is an error, the info table lists the op."""

from __future__ import annotations

import inspect

import pytest
import torch

import semmim.kernels as K
from semmim.kernels import info
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
