"""The exported-weights format (``semmim export RUN --format hf DIR``) and its reader.

What the folder holds and why is described in :mod:`semmim.export` (the writer). This module is
what both sides share (file names, the tensors an export holds) and :func:`load_hf`, the reader
behind ``SemMIM.from_pretrained(DIR)``: it builds the model from config.json (reading no other
file: the exported config names no ``*.pretrained`` path), checks model.safetensors against its
recorded SHA-256, loads every tensor bit for bit and sets the EMA copy to the loaded weights (as a
fresh model starts); queues and centres are freshly initialised. Returned in eval mode. It imports
no model module (the class is passed in), so ``semmim.model`` can call it without a cycle.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from semmim.config import SemMIMConfig

__all__ = [
    "FORMATS",
    "WEIGHTS",
    "MODEL_TYPE",
    "ExportError",
    "exported_tensors",
    "load_hf",
    "tied_aliases",
]

FORMATS = ("hf",)
WEIGHTS = "model.safetensors"
MODEL_TYPE = "semmim"


class ExportError(ValueError):
    """An export or load that cannot proceed; the message names the folder or file and why."""


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """State-dict names that share storage with an earlier name (the tied MLM decoder)."""
    seen: set[int] = set()
    out = set()
    for name, t in model.state_dict().items():
        if t.numel() and t.data_ptr() in seen:
            out.add(name)
        seen.add(t.data_ptr())
    return out


def exported_tensors(
    state: dict[str, torch.Tensor], aliases: set[str], ema: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors an export holds, from a ``SemMIM.state_dict()``: ``net.*`` (or with ``ema``
    the ``ema.*`` tensors under ``net.`` names) and ``temp``, aliases left out."""
    src = "ema." if ema else "net."
    out = {"net." + k[len(src) :]: v for k, v in state.items() if k.startswith(src)}
    out["temp"] = state["temp"]
    return {k: v.detach().cpu().contiguous() for k, v in out.items() if k not in aliases}


def load_hf(path: str | os.PathLike, model_cls: type, device: str | torch.device = "cpu") -> Any:
    """A :class:`semmim.SemMIM` from a folder :func:`export_hf` wrote (eval mode, on
    ``device``); ``model_cls`` is :class:`semmim.SemMIM` (passed in by
    ``SemMIM.from_pretrained``, so this module imports no model). ExportError naming the folder / file when something is missing or altered."""
    from safetensors.torch import load_file

    from semmim.checkpoint import file_sha256
    from semmim.tokenizer import load_tokenizer

    path = str(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise ExportError(f"from_pretrained: no config.json in {path}")
    with open(cfg_file) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as err:
            raise ExportError(f"from_pretrained: {cfg_file}: not JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("model_type") != MODEL_TYPE:
        got = meta.get("model_type") if isinstance(meta, dict) else type(meta).__name__
        raise ExportError(f"from_pretrained: {cfg_file}: model_type {got!r}, not 'semmim'")
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise ExportError(f"from_pretrained: no {WEIGHTS} in {path}")
    want = meta.get("files", {}).get(WEIGHTS, {}).get("sha256")
    if want and file_sha256(weights) != want:
        raise ExportError(
            f"from_pretrained: {weights}: checksum differs from config.json's (the file changed "
            "after the export, or the folder mixes two exports)"
        )
    cfg = SemMIMConfig.from_dict(meta["semmim_config"])
    vocab = os.path.join(path, "vocab.txt")
    model = model_cls(cfg, load_tokenizer(vocab if os.path.isfile(vocab) else None))
    tensors = load_file(weights, device="cpu")
    aliases = tied_aliases(model)
    expected = set(exported_tensors(model.state_dict(), aliases))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ExportError(
            f"from_pretrained: {weights} does not fit its config.json: missing {missing[:6]}, "
            f"unexpected {extra[:6]}"
        )
    own = model.state_dict()
    bad = [k for k, v in tensors.items() if v.shape != own[k].shape or v.dtype != own[k].dtype]
    if bad:
        raise ExportError(f"from_pretrained: {weights}: shape or dtype differs for {bad[:6]}")
    with torch.no_grad():
        for k, v in tensors.items():
            own[k].copy_(v)
        model.ema.load_state_dict(model.net.state_dict())
    return model.to(device).eval()
