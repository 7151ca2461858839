"""Training loop: exact resume, schedule, weight-decay groups, logs/plot/eval outputs (tiny, CPU)."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from run_helpers import small_run

from semmim import build_model, from_preset
from semmim.checkpoint import load_checkpoint
from semmim.run_config import TrainConfig
from semmim.train import (
    lr_lambda,
    param_groups,
    setup,
    step_seed,
    train,
    train_step,
)

LOSS_KEYS = ("loss", "itc", "itm", "mlm", "glob", "mim")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """One intra-op thread (conftest's ``one_thread``) for every test here."""


def _tcfg(out, **kw) -> TrainConfig:
    return small_run(out, **{"data": "synthetic:64:24", "steps": 10, **kw})


def _losses(history):
    return [tuple(row[k] for k in LOSS_KEYS) for row in history]


def test_resume_continues_exactly(tmp_path):
    cfg = from_preset("tiny")
    straight = train(cfg, _tcfg(tmp_path / "a"))
    first = train(cfg, _tcfg(tmp_path / "b", stop_at=5))
    assert first["step"] == 5
    state = load_checkpoint(str(tmp_path / "b"))
    assert state["step"] == 5 and state["batch_in_epoch"] == 5
    for key in ("image_queue", "queue_ptr", "glob_center", "mim_center"):
        assert key in state["model"]
    assert any(k.startswith("ema.") for k in state["model"])
    second = train(cfg, _tcfg(tmp_path / "b"), resume=True)
    assert second["step"] == 10
    assert _losses(first["history"]) + _losses(second["history"]) == _losses(straight["history"])
    a = load_checkpoint(str(tmp_path / "a"))["model"]
    b = load_checkpoint(str(tmp_path / "b"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with open(tmp_path / "b" / "log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 11))


def test_outputs_eval_and_accumulation(tmp_path):
    summary = train(
        from_preset("tiny"),
        _tcfg(tmp_path, steps=3, accum_steps=2, eval_at_end=True, eval_rerank_k=4, val_size=0.1),
    )
    for name in ("log.csv", "loss.png", "eval.json", "eval.txt", "summary.json", "config.json"):
        assert os.path.exists(tmp_path / name), name
    assert summary["eval"]["n_images"] == 24 and "itm" in summary["eval"]
    assert summary["eval"]["zero_shot"]["n_classes"] == 5
    assert 0.0 <= summary["data_wait_share"] <= 1.0


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)


def test_param_groups_skip_norms_biases_embeddings_and_ema():
    model = build_model(from_preset("tiny"))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert not any(n.startswith("ema.") for n in decay_names | no_decay_names)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any("word_embeddings" in n for n in no_decay_names)
    assert any(n.endswith(".bias") for n in no_decay_names)
    assert "temp" in no_decay_names
    # the model's own list (timm's no_weight_decay convention) is honoured: predictor_pos
    # is a (1, P+1, D) parameter that the name rules alone would decay
    assert model.no_weight_decay() <= no_decay_names
    assert "net.predictor_pos" in no_decay_names and "net.predictor_pos" not in decay_names
    assert "net.head.prototypes" in decay_names  # a weight, decayed as DINO's last layer
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for g in (decay, no_decay) for p in g["params"])


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = from_preset("tiny")
    a, b = build_model(cfg), build_model(cfg)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing()
    assert b.net.vision.grad_checkpointing and not b.ema.vision.grad_checkpointing
    images = torch.randn(3, 3, 64, 64)
    tok = a.tokenizer(
        ["a red circle", "a blue star on the left", "x"], padding=True, return_tensors="pt"
    )
    for m in (a, b):
        m(images, tok["input_ids"], tok["attention_mask"], seed=1).loss.backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_train_config_errors():
    with pytest.raises(ValueError, match="train.batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="train.nope"):
        TrainConfig().override({"nope": 1})
    with pytest.raises(ValueError, match="train.flip"):
        TrainConfig(flip="sideways")
    for bad in ({"steps": 0}, {"steps": 0, "epochs": 0.0}, {"steps": 5, "epochs": 1.0}):
        with pytest.raises(ValueError, match="train.steps"):
            TrainConfig(**bad)
    assert TrainConfig().override({"epochs": 2}).steps == 0  # epochs alone: measured in epochs
    assert TrainConfig(amp=False).amp == "off" and TrainConfig(amp=True).amp == "auto"
    assert TrainConfig.from_dict(TrainConfig(lr=1e-2).to_dict()) == TrainConfig(lr=1e-2)


SMALL = {"vision.image_size": 32, "itc.queue_size": 16, "loss.mlm": 0.0}


def test_step_is_unit_of_commit_and_draws_no_host_random_number(tmp_path, caplog):
    """A step reads no number from the global RNGs (its seed is explicit) and advances step by 1."""
    import logging
    import random

    import numpy as np

    run = setup(from_preset("tiny", SMALL), _tcfg(tmp_path, steps=3))
    run.model.train()
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with caplog.at_level(logging.INFO, logger="semmim.train"):
        out = train_step(run, check_inputs=True)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert (before[2] == after[2]).all()
    assert run.step == 1 and run.stream.batch_in_epoch == 1 and set(out["losses"]) >= {"loss"}
    run.stream.close()
    seeds = {step_seed(0, s, m, r) for s in range(50) for m in range(2) for r in range(4)}
    assert len(seeds) == 400 and all(0 <= x < 2**62 for x in seeds)
    assert step_seed(0, 3, 0, 0) == step_seed(0, 3, 0, 0) != step_seed(1, 3, 0, 0)


def test_first_step_logs_the_backends_that_ran(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="semmim.train"):
        train(from_preset("tiny", SMALL), _tcfg(tmp_path, steps=2))
    lines = [r.getMessage() for r in caplog.records if "kernels (first step)" in r.getMessage()]
    assert len(lines) == 1 and "masked_gather=" in lines[0], lines


@pytest.mark.parametrize("opts", [{"amp": "bf16"}, {"compile": True}])
def test_two_step_run_with_cpu_bf16_autocast_or_compile(opts, tmp_path, monkeypatch):
    """Step 1 runs eagerly with checks; under ``compile`` step 2 runs the torch.compile'd model.

    Dynamo traces the whole training step here; the graphs run on the "aot_eager" backend, because
    Inductor's C++ code generation takes minutes on a 2-core CI machine (the Inductor-compiled step
    against eager is tests/test_gpu_path.py::test_compiled_training_step_matches_eager).
    """
    calls = []
    real_compile = torch.compile

    def compile_(module, **kw):
        calls.append(module)
        return real_compile(module, **{**kw, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_)
    cfg = from_preset("tiny", {**SMALL, "vision.depth": 1, "text.depth": 1, "fusion.depth": 1})
    summary = train(cfg, _tcfg(tmp_path, steps=2, **opts))
    assert summary["step"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for row in summary["history"] for v in row.values())
    assert len(calls) == (1 if opts.get("compile") else 0)
