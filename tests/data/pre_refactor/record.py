"""Record what the model code of main 3f5c839 (before the objectives split of issue 20) computes,
for tests/test_pre_refactor.py to compare the current code with bit for bit.

Run with the OLD code (its ``SemMIM(cfg)`` loads the tokenizer itself):

    cd <checkout of 3f5c839> && python -P tests/data/pre_refactor/record.py OUT.json

For each config below: torch.manual_seed(0), build the tiny model, then
1. a training-mode forward with diagnostics (seed 11), its backward, an SGD step (lr 0.05) and
   ``update_momentum``; 2. a second training-mode forward (seed 12: the queue and the centres
   were written by step 1); 3. an eval-mode forward (seed 13). Each loss, diagnostic and the sums
   of the queues / centres are stored as ``float.hex`` strings (exact).
"""

import json
import sys

import torch

from semmim import SemMIM, from_preset

CONFIGS = {
    "tiny": {},
    "pixel": {"mim.target": "pixel"},
    "full_tokens_all_centre": {"mim.drop_tokens": False, "mim.center_over": "all"},
    "text_cls_norm_random": {
        "mim.psi": "text_cls",
        "mim.psi_norm": True,
        "masking.strategy": "random",
    },
    "no_text_in_target_tau0": {"mim.text_in_target": False, "masking.tau": 0.0},
    "albef": {"mim.enabled": False},
}
CAPTIONS = ["a red circle", "a blue square on the left", "a red circle", "two green triangles"]


def hexed(d):
    return {k: float(v.detach()).hex() for k, v in d.items()}


def state_sums(model):
    names = ["image_queue", "text_queue", "id_queue", "queue_ptr", "glob_center", "mim_center"]
    return {n: float(getattr(model, n).double().sum()).hex() for n in names} | {
        "params": float(sum(p.double().sum() for p in model.parameters())).hex()
    }


def record(overrides):
    cfg = from_preset("tiny", overrides)
    torch.manual_seed(0)
    model = SemMIM(cfg).train()
    gen = torch.Generator().manual_seed(5)
    S = cfg.vision.image_size
    images = torch.randn(len(CAPTIONS), 3, S, S, generator=gen)
    enc = model.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    image_ids = torch.tensor([0, 1, 0, 2])
    model.set_step(1, 10)
    out = model(images, ids, mask, seed=11, image_ids=image_ids, diagnostics=True)
    rec = {"step1": hexed({"loss": out.loss, **out.losses}), "diag": hexed(out.diagnostics)}
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.05 * p.grad)
    model.update_momentum()
    model.set_step(2, 10)
    out = model(images, ids, mask, seed=12, image_ids=image_ids)
    rec["step2"] = hexed({"loss": out.loss, **out.losses})
    rec["state"] = state_sums(model)
    model.eval()
    out = model(images, ids, mask, seed=13)
    rec["eval"] = hexed({"loss": out.loss, **out.losses})
    return rec


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = {name: {"overrides": o, **record(o)} for name, o in CONFIGS.items()}
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)
