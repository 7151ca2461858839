"""Two-process DDP runs on CPU with gloo: ranks stay in sync, ITC queue (features and image ids)
and centres agree; the fine-tuning tasks too."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from run_helpers import dist_env, free_port


def _worker(rank: int, world_size: int, port: int, out_dir: str, task_name: str = "") -> None:
    dist_env(rank, world_size, port)
    torch.set_num_threads(1)
    from semmim import from_preset
    from semmim.train import TrainConfig, train

    tcfg = TrainConfig(
        data="synthetic:64:8",
        out=out_dir,
        steps=3,
        batch_size=4,
        num_workers=0,
        eval_at_end=False,
        log_every=1,
        ckpt_every=100,
    )
    model_cfg, task = from_preset("tiny", **{"vision.image_size": 32}), None
    if task_name:
        from semmim.downstream.tasks import TaskConfig, init_model_config, make_task

        task = make_task(task_name, TaskConfig(num_answers=12))
        model_cfg = init_model_config(task.cfg, model_cfg)
    summary = train(model_cfg, tcfg, return_model=True, task=task)
    sd = summary["model"].state_dict()
    torch.save({"step": summary["step"], "state": sd}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_gloo_ddp(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["step"] == r1["step"] == 3
    a, b = r0["state"], r1["state"]
    # DDP averaged the gradients: trained and EMA weights identical on both ranks.
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The queue holds all-gathered momentum features of both ranks' batches: 3 steps x 2 ranks x 4.
    assert int(a["queue_ptr"]) == 24
    assert torch.count_nonzero(a["glob_center"]) > 0  # centres updated (and all-reduced: equal)
    assert (tmp_path / "checkpoints" / "latest").exists()
    # the image ids of both ranks' pairs were queued beside their features (no slot left empty)
    assert (a["id_queue"][:24] >= 0).all() and (a["id_queue"][24:] == -1).all()


@pytest.mark.parametrize("task", ["retrieval", "vqa", "caption"])
def test_two_process_gloo_ddp_finetuning(tmp_path, task):
    """Each fine-tuning task on the same loop under DDP: both ranks end with identical weights
    (gradients averaged), the step count and checkpoint written once."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), task), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["step"] == r1["step"] == 3
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert (tmp_path / "checkpoints" / "latest").exists()
