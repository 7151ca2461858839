"""Start pre-training from an ALBEF checkpoint: ``semmim train --init albef:FILE``.

ALBEF (Li et al. 2021, github.com/salesforce/ALBEF) is the model SemMIM extends; its
``Pretrain.py`` saves ``{"model": state_dict, "optimizer": …, "config": …, "epoch": …}``. The
state dict's names (``models/model_pretrain.py``, ``models/vit.py``, ``models/xbert.py``), for
ALBEF's geometry (ViT-B/16; BERT-base with ``fusion_layer=6``: layers 0–5 text, 6–11 fusion):

======================================================  ==========================================
ALBEF                                                   semmim
======================================================  ==========================================
``visual_encoder.{cls_token,pos_embed}``                ``net.vision.{cls_token,pos_embed}``
``visual_encoder.patch_embed.proj.*``                   ``net.vision.patch_embed.*``
``visual_encoder.blocks.i.{norm1,attn.qkv,attn.proj,    ``net.vision.blocks.i.`` same names,
norm2,mlp.fc1,mlp.fc2}.*``, ``visual_encoder.norm.*``   ``mlp.0`` / ``mlp.2``; ``net.vision.norm.*``
``text_encoder.bert.embeddings.{word,position,          ``net.text.{…}_embeddings.weight``,
token_type}_embeddings.weight``, ``….LayerNorm.*``      ``net.text.norm.*``
``text_encoder.bert.encoder.layer.i`` (i < 6)           ``net.text.layers.i``
``text_encoder.bert.encoder.layer.(6+j)``               ``net.fusion.layers.j``
  ``attention.self.{query,key,value}``                    ``attn.qkv`` (rows [q; k; v])
  ``attention.output.{dense,LayerNorm}``                  ``attn.proj``, ``norm1``
  ``crossattention.self.query``                           ``cross.q``
  ``crossattention.self.{key,value}``                     ``cross.kv`` (rows [k; v])
  ``crossattention.output.{dense,LayerNorm}``             ``cross.proj``, ``norm_cross``
  ``intermediate.dense``, ``output.{dense,LayerNorm}``    ``mlp.0``, ``mlp.2``, ``norm2``
``text_encoder.cls.predictions.transform.{dense,        ``net.mlm_head.{dense,norm}``,
LayerNorm}``, ``….predictions.bias``                    ``net.mlm_head.bias``
``vision_proj``, ``text_proj``, ``itm_head``, ``temp``  ``net.vision_proj`` … ``temp``
``visual_encoder_m``, ``text_encoder_m``,               the same under ``ema.`` (the momentum
``vision_proj_m``, ``text_proj_m``                      model); ``ema.itm_head`` ← ``itm_head``
``image_queue``, ``text_queue`` (E, Q), ``queue_ptr``   ``image_queue``, ``text_queue`` (Q, E),
(1,)                                                    ``queue_ptr`` ()
======================================================  ==========================================

Not loaded, by design: ``…cls.predictions.decoder.weight`` / ``.bias`` (tied to the word
embeddings and to ``predictions.bias``: semmim's MLM decoder is the embedding table itself) and
the ``position_ids`` buffer. semmim's own parts (the MIM predictor, the prototype heads, the
[MASK] patch embedding, the DINO centres, the queue's image ids) keep their initialisation; an
``ema.`` tensor the file does not give is copied from ``net.`` (ALBEF's ``copy_params``).

Checks: a tensor whose shape differs from the model's is refused by name (so a ``--preset`` that
is not ALBEF's geometry fails at once); the ViT position table is resampled when only the image
size differs (ALBEF pre-trains at 256 px: 16×16 → ``vision.image_size / 16``). Names the model
does not use (an ALBEF fine-tuning head, a text decoder …) are listed, not loaded. The file is
read with ``torch.load(weights_only=True)`` (:func:`semmim.checkpoint.read_checkpoint`): it
holds data, never code. Head counts and LayerNorm epsilons are not in a state dict: ALBEF's
(12 heads, 1e-6 ViT, 1e-12 BERT) are the ``base`` preset's.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch

from semmim.config import SemMIMConfig

log = logging.getLogger("semmim.albef")

__all__ = [
    "InitError",
    "Entry",
    "InitReport",
    "albef_entries",
    "albef_to_semmim",
    "semmim_to_albef",
    "read_albef",
    "load_albef",
    "check_init",
    "init_from",
]

REPORT_FILE = "init_report.txt"
# ALBEF names that are not parameters of their own: tied copies and a buffer of positions.
_TIED = re.compile(
    r"^text_encoder(_m)?\.(cls\.predictions\.decoder\.(weight|bias)|bert\.embeddings\.position_ids)$"
)


class InitError(ValueError):
    """An ``--init`` file that cannot start the run; the message names the file and tensor."""


@dataclass(frozen=True)
class Entry:
    """One tensor of ours from ALBEF tensors: ``kind`` "copy" (one tensor), "cat" (rows of
    ``theirs`` stacked along dim 0: fused qkv / kv), "transpose" (a queue) or "scalar" (the
    (1,) queue pointer → 0-d)."""

    ours: str
    theirs: tuple[str, ...]
    kind: str = "copy"


def _wb(ours: str, theirs: str) -> list[Entry]:
    return [Entry(f"{ours}.{k}", (f"{theirs}.{k}",)) for k in ("weight", "bias")]


def _bert_layer(ours: str, theirs: str, cross: bool) -> list[Entry]:
    out = [
        Entry(
            f"{ours}.attn.qkv.{k}",
            tuple(f"{theirs}.attention.self.{n}.{k}" for n in ("query", "key", "value")),
            "cat",
        )
        for k in ("weight", "bias")
    ]
    out += _wb(f"{ours}.attn.proj", f"{theirs}.attention.output.dense")
    out += _wb(f"{ours}.norm1", f"{theirs}.attention.output.LayerNorm")
    if cross:
        out += _wb(f"{ours}.cross.q", f"{theirs}.crossattention.self.query")
        out += [
            Entry(
                f"{ours}.cross.kv.{k}",
                tuple(f"{theirs}.crossattention.self.{n}.{k}" for n in ("key", "value")),
                "cat",
            )
            for k in ("weight", "bias")
        ]
        out += _wb(f"{ours}.cross.proj", f"{theirs}.crossattention.output.dense")
        out += _wb(f"{ours}.norm_cross", f"{theirs}.crossattention.output.LayerNorm")
    out += _wb(f"{ours}.mlp.0", f"{theirs}.intermediate.dense")
    out += _wb(f"{ours}.mlp.2", f"{theirs}.output.dense")
    out += _wb(f"{ours}.norm2", f"{theirs}.output.LayerNorm")
    return out


def albef_entries(cfg: SemMIMConfig) -> list[Entry]:
    """The mapping for a model of ``cfg``: ALBEF's text encoder layer ``i`` is our text layer
    for ``i < text.depth`` (ALBEF's ``fusion_layer``), fusion layer ``i - text.depth`` after."""
    entries: list[Entry] = []
    for ours, m in (("net", ""), ("ema", "_m")):
        v, t = f"visual_encoder{m}", f"text_encoder{m}"
        entries += [
            Entry(f"{ours}.vision.cls_token", (f"{v}.cls_token",)),
            Entry(f"{ours}.vision.pos_embed", (f"{v}.pos_embed",)),
        ]
        entries += _wb(f"{ours}.vision.patch_embed", f"{v}.patch_embed.proj")
        for i in range(cfg.vision.depth):
            a, b = f"{ours}.vision.blocks.{i}", f"{v}.blocks.{i}"
            for part in ("norm1", "attn.qkv", "attn.proj", "norm2"):
                entries += _wb(f"{a}.{part}", f"{b}.{part}")
            entries += _wb(f"{a}.mlp.0", f"{b}.mlp.fc1") + _wb(f"{a}.mlp.2", f"{b}.mlp.fc2")
        entries += _wb(f"{ours}.vision.norm", f"{v}.norm")
        for name in ("word", "position", "token_type"):
            entries.append(
                Entry(
                    f"{ours}.text.{name}_embeddings.weight",
                    (f"{t}.bert.embeddings.{name}_embeddings.weight",),
                )
            )
        entries += _wb(f"{ours}.text.norm", f"{t}.bert.embeddings.LayerNorm")
        for i in range(cfg.text.depth):
            entries += _bert_layer(f"{ours}.text.layers.{i}", f"{t}.bert.encoder.layer.{i}", False)
        for j in range(cfg.fusion.depth):
            k = cfg.text.depth + j
            entries += _bert_layer(f"{ours}.fusion.layers.{j}", f"{t}.bert.encoder.layer.{k}", True)
        p = f"{t}.cls.predictions"
        entries += _wb(f"{ours}.mlm_head.dense", f"{p}.transform.dense")
        entries += _wb(f"{ours}.mlm_head.norm", f"{p}.transform.LayerNorm")
        entries.append(Entry(f"{ours}.mlm_head.bias", (f"{p}.bias",)))
        entries += _wb(f"{ours}.vision_proj", f"vision_proj{m}")
        entries += _wb(f"{ours}.text_proj", f"text_proj{m}")
    entries += _wb("net.itm_head", "itm_head")
    entries += [
        Entry("temp", ("temp",)),
        Entry("image_queue", ("image_queue",), "transpose"),
        Entry("text_queue", ("text_queue",), "transpose"),
        Entry("queue_ptr", ("queue_ptr",), "scalar"),
    ]
    return entries


def _normalise_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``module.`` (DDP) removed; a fine-tuned ALBEF's ``text_encoder.{embeddings,encoder}``
    (a BertModel, not BertForMaskedLM) read as ``text_encoder.bert.…``."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^module\.", "", key)
        key = re.sub(r"^(text_encoder(?:_m)?)\.(embeddings|encoder)\.", r"\1.bert.\2.", key)
        out[key] = value
    return out


def albef_to_semmim(
    state: dict[str, torch.Tensor], cfg: SemMIMConfig
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An ALBEF state dict → (our tensors by name, ALBEF names not used).

    Only entries whose ALBEF tensors are all present are returned; shapes are not checked here
    (:func:`load_albef` checks them against the model). Tied copies and ``position_ids`` are not
    reported as unused.
    """
    state = _normalise_names(state)
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for e in albef_entries(cfg):
        if not all(n in state for n in e.theirs):
            continue
        parts = [state[n] for n in e.theirs]
        if e.kind == "cat":
            value = torch.cat(parts)
        elif e.kind == "transpose":
            value = parts[0].t()
        elif e.kind == "scalar":
            value = parts[0].reshape(())
        else:
            value = parts[0]
        ours[e.ours] = value
        used.update(e.theirs)
    unused = sorted(k for k in state if k not in used and not _TIED.match(k))
    return ours, unused


def semmim_to_albef(state: dict[str, torch.Tensor], cfg: SemMIMConfig) -> dict[str, torch.Tensor]:
    """Our state dict → ALBEF's names and layouts (the inverse of :func:`albef_to_semmim` on
    the tensors both have), with ALBEF's tied decoder copies and ``position_ids`` added, as
    ``ALBEF(...).state_dict()`` holds them. For tests and for tools that expect ALBEF's names."""
    out: dict[str, torch.Tensor] = {}
    for e in albef_entries(cfg):
        if e.ours not in state:
            continue
        value = state[e.ours]
        if e.kind == "cat":
            for name, part in zip(e.theirs, value.chunk(len(e.theirs))):
                out[name] = part
        elif e.kind == "transpose":
            out[e.theirs[0]] = value.t()
        elif e.kind == "scalar":
            out[e.theirs[0]] = value.reshape(1)
        else:
            out[e.theirs[0]] = value
    for m in ("", "_m"):
        t = f"text_encoder{m}"
        if f"{t}.bert.embeddings.word_embeddings.weight" in out:
            out[f"{t}.cls.predictions.decoder.weight"] = out[
                f"{t}.bert.embeddings.word_embeddings.weight"
            ]
            rows = out[f"{t}.bert.embeddings.position_embeddings.weight"].shape[0]
            out[f"{t}.bert.embeddings.position_ids"] = torch.arange(rows)[None]
        if f"{t}.cls.predictions.bias" in out:
            out[f"{t}.cls.predictions.decoder.bias"] = out[f"{t}.cls.predictions.bias"]
    return out


def read_albef(path: str) -> dict[str, torch.Tensor]:
    """The state dict of an ALBEF checkpoint file (``{"model": …}`` as ``Pretrain.py`` saves
    it, or a bare state dict), loaded with ``weights_only=True``. InitError naming the file."""
    from semmim.checkpoint import CheckpointError, read_checkpoint

    try:
        obj = read_checkpoint(path, verify=False)  # ALBEF's files have no semmim sidecar
    except CheckpointError as err:
        raise InitError(f"--init albef:{path}: {err}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise InitError(
            f"--init albef:{path}: not a state dict of tensors ({bad[0]!r} is a "
            f"{type(obj[bad[0]]).__name__}; keys {sorted(obj)[:8]})"
        )
    return obj


@dataclass
class InitReport:
    """What :func:`load_albef` did: tensors set, ALBEF names unused, our tensors left as they
    were initialised (the EMA copies taken from ``net.`` are listed separately)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    not_in_file: list[str] = field(default_factory=list)
    ema_from_net: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)

    def text(self) -> str:
        """The report as written to ``OUT/init_report.txt``."""
        lines = [
            f"--init albef:{self.source}",
            f"loaded: {len(self.loaded)} tensors",
            *(f"resampled: {r}" for r in self.resampled),
            f"ALBEF tensors not used ({len(self.unused)}): the model has no place for them",
            *(f"  {k}" for k in self.unused),
            f"model tensors not in the file ({len(self.not_in_file)}): kept their "
            "initialisation (semmim's own parts)",
            *(f"  {k}" for k in self.not_in_file),
            f"momentum (ema.) tensors copied from net. ({len(self.ema_from_net)}): ALBEF has "
            "no momentum copy of them",
            *(f"  {k}" for k in self.ema_from_net),
        ]
        return "\n".join(lines) + "\n"


@torch.no_grad()
def load_albef(model: torch.nn.Module, path: str) -> InitReport:
    """Copy an ALBEF checkpoint into a :class:`semmim.SemMIM` (in place); returns the report.

    InitError naming the file and tensor when a shape differs (beyond the resampled position
    table), or when the file holds no ALBEF tensor at all.
    """
    from semmim.model import SemMIM
    from semmim.pretrained import interpolate_pos_embed

    if not isinstance(model, SemMIM):
        raise InitError(f"--init albef:{path}: needs a SemMIM, got a {type(model).__name__}")
    cfg = model.cfg
    ours, unused = albef_to_semmim(read_albef(path), cfg)
    own = model.state_dict()
    unknown = sorted(k for k in ours if k not in own)  # e.g. the MLM head with loss.mlm=0
    report = InitReport(path, unused=sorted(unused + [f"(for {k})" for k in unknown]))
    for k in unknown:
        del ours[k]
    if not ours:
        raise InitError(
            f"--init albef:{path}: no ALBEF tensor in it (expected visual_encoder.*, "
            f"text_encoder.bert.*, …; found {sorted(unused)[:6]})"
        )
    queues = ("image_queue", "text_queue", "queue_ptr")
    if any(k in ours and ours[k].shape != own[k].shape for k in queues[:2]):
        # the queue is training state, not weights: another itc.queue_size starts a fresh one
        for k in queues:
            if ours.pop(k, None) is not None:
                report.unused.append(f"(for {k}: itc.queue_size={cfg.itc.queue_size} differs)")
    grid = cfg.vision.image_size // cfg.vision.patch_size
    bad = []
    for k, v in ours.items():
        if k.endswith("vision.pos_embed") and v.dim() == 3 and v.shape[1:] != own[k].shape[1:]:
            try:
                rows = v.shape[1] - 1
                ours[k] = v = interpolate_pos_embed(v, grid, 1)
                report.resampled.append(f"{k}: {rows} → {grid * grid} positions")
            except ValueError:
                pass  # not a square grid: reported as a shape mismatch below
        if tuple(v.shape) != tuple(own[k].shape):
            bad.append(f"{k}: {tuple(v.shape)} in the file vs {tuple(own[k].shape)} in the model")
    if bad:
        raise InitError(
            f"--init albef:{path}: shapes differ from the model (ALBEF is the base preset's "
            f"geometry: --preset base): " + "; ".join(bad[:8]) + (" …" if len(bad) > 8 else "")
        )
    for k, v in ours.items():
        own[k].copy_(v)
    report.loaded = sorted(ours)
    set_ptrs = {own[k].data_ptr() for k in ours}
    net = dict(model.net.state_dict())
    for k in own:
        if own[k].data_ptr() in set_ptrs:
            continue  # loaded, or an alias of a loaded tensor (the tied MLM decoder)
        if k.startswith("ema.") and k.removeprefix("ema.") in net and "net." + k[4:] in ours:
            own[k].copy_(net[k.removeprefix("ema.")])
            report.ema_from_net.append(k)
        else:
            report.not_in_file.append(k)
    log.info(
        "--init albef:%s: %d tensors loaded, %d ALBEF tensors unused, %d model tensors kept "
        "their initialisation",
        path,
        len(report.loaded),
        len(report.unused),
        len(report.not_in_file),
    )
    return report


def check_init(spec: str, task: str = "pretrain") -> str | None:
    """The file of ``train.init`` (``albef:FILE``; None for ""), InitError when it is not a
    readable file or the run is not pre-training: checked before a run lists its data or
    builds its model."""
    from semmim.run_config import parse_init

    parsed = parse_init(spec)
    if parsed is None:
        return None
    path = parsed[1]
    if task != "pretrain":
        raise InitError(
            f"--init albef:{path}: starts pre-training (semmim train), not a {task} fine-tuning "
            "run, which starts from a semmim checkpoint (--ckpt): pre-train from --init first"
        )
    if not os.path.isfile(path):
        raise InitError(f"--init albef:{path}: no such file")
    if not os.access(path, os.R_OK):
        raise InitError(f"--init albef:{path}: not readable (permissions)")
    return path


def init_from(
    model: torch.nn.Module, spec: str, out_dir: str | None, task: str = "pretrain"
) -> InitReport | None:
    """Apply ``train.init`` (``albef:FILE``) to a freshly built pre-training model; the report
    goes to ``out_dir/init_report.txt`` when ``out_dir`` is given (rank 0). None for ``""``."""
    from semmim.rundir import write_text

    path = check_init(spec, task)
    if path is None:
        return None
    report = load_albef(model, path)
    if out_dir is not None:
        write_text(os.path.join(out_dir, REPORT_FILE), report.text())
        log.info("--init: the full list is in %s", os.path.join(out_dir, REPORT_FILE))
    return report
