"""Weights others can load: ``semmim export RUN --format hf DIR`` and ``SemMIM.from_pretrained``.

The folder follows the Hugging Face layout (what ``save_pretrained`` writes)::

    DIR/model.safetensors    the weights (safetensors: tensors only, no pickle)
    DIR/config.json          {"model_type": "semmim", "semmim_config": SemMIMConfig.to_dict(),
                              "weights": "net" | "ema", "source": {...}, "files": {sha256, bytes}}
    DIR/vocab.txt, tokenizer.json, tokenizer_config.json
                             the caption tokenizer (WordPiece vocabulary; save_pretrained's files,
                             so transformers' AutoTokenizer.from_pretrained(DIR) reads it too)
    DIR/README.md            a model card: what it is, how to load it, the config, the source

**What is exported**: the trained towers ``net.*`` and the ITC temperature ``temp``, named as in
``SemMIM.state_dict()`` (the tied MLM decoder, an alias of the word embeddings, is stored once) —
what retrieval, ITM scoring and fine-tuning use. ``--ema`` exports the momentum (EMA) towers in
their place (a DINO-style teacher is sometimes the better encoder); config.json's ``weights``
says which. The EMA copy itself, the ITC queues and the DINO centres are training state, not
exported: continue pre-training from the run's checkpoint (``semmim train --resume``).

:func:`semmim.hf_format.load_hf` (``SemMIM.from_pretrained(DIR)``) builds the model from config.json (reading no
other file: the exported config names no ``*.pretrained`` path), checks model.safetensors against
its recorded SHA-256, loads every tensor bit for bit and sets the EMA copy to the loaded weights
(as a fresh model starts); queues and centres are freshly initialised. Returned in eval mode.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from semmim.config import SemMIMConfig
from semmim.hf_format import (
    FORMATS,
    MODEL_TYPE,
    WEIGHTS,
    ExportError,
    exported_tensors,
    tied_aliases,
)

log = logging.getLogger("semmim.export")

__all__ = ["FORMATS", "ExportError", "export_hf"]


def _check_target(out: str, run: str, overwrite: bool) -> None:
    from semmim.checkpoint import is_sharded_step
    from semmim.paths import inside
    from semmim.rundir import holds_run

    run_dir = os.path.realpath(run)
    if os.path.isfile(run_dir) or is_sharded_step(run_dir):
        run_dir = os.path.dirname(run_dir)  # RUN/checkpoints/step_*.pt or a sharded step_*/
    if os.path.basename(run_dir) == "checkpoints":
        run_dir = os.path.dirname(run_dir)
    ckpts, out_abs = os.path.join(run_dir, "checkpoints"), os.path.realpath(out)
    if out_abs in (run_dir, ckpts) or inside(out_abs, ckpts):
        raise ExportError(f"export: DIR {out} is the run's own folder; give another folder")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"export: DIR {out} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if holds_run(out):
            raise ExportError(
                f"export: DIR {out} holds a training run ({', '.join(holds_run(out))}); "
                "refusing to write an export into it, even with --overwrite"
            )
        if not overwrite:
            raise ExportError(
                f"export: DIR {out} is not empty ({', '.join(sorted(os.listdir(out))[:5])}); "
                "give an empty or new folder, or --overwrite to replace the export's files in it"
            )


def _model_card(cfg: SemMIMConfig, meta: dict[str, Any], out: str) -> str:
    v, t = cfg.vision, cfg.text
    src = meta["source"]
    rows = [
        ("image encoder", f"ViT {v.image_size} px, patch {v.patch_size}, width {v.dim}, "
         f"{v.depth} blocks, {v.heads} heads"),
        ("text encoder", f"BERT width {t.dim}, {t.depth} layers, {t.heads} heads, "
         f"vocabulary {t.vocab_size}"),
        ("fusion encoder", f"{cfg.fusion.depth} layers with cross-attention to the image"),
        ("ITC embedding", f"{cfg.itc.embed_dim}"),
        ("MIM", f"{'on' if cfg.mim.enabled else 'off'}, target {cfg.mim.target}, "
         f"{cfg.head.num_prototypes} prototypes"),
        ("weights", "momentum (EMA) towers" if meta["weights"] == "ema" else "trained towers"),
        ("source", f"{src['checkpoint']} (step {src['step']} of {src['total_steps']})"),
    ]  # fmt: skip
    table = "\n".join(f"| {k} | {val} |" for k, val in rows)
    return f"""# SemMIM model

A SemMIM vision-language model (ALBEF's ITC / ITM / MLM with semantic masked image modelling),
exported by `semmim export --format hf`. The image, text and fusion encoders, the ITC
projections, the ITM and MLM heads and the MIM predictor / prototype heads are in
`model.safetensors`; the full configuration is `semmim_config` in `config.json`.

| | |
|---|---|
{table}

## Loading

```python
from semmim import SemMIM

model = SemMIM.from_pretrained("{os.path.basename(os.path.abspath(out))}")   # eval mode, CPU
img = model.encode_image(images)                       # (B, 3, {v.image_size}, {v.image_size}) -> (B, {cfg.itc.embed_dim})
txt = model.encode_text(input_ids, attention_mask)     # ids from model.tokenizer
p_match = model.itm_score(images, input_ids, attention_mask)
```

The tokenizer (BERT WordPiece, uncased) is in this folder (`vocab.txt`, `tokenizer.json`).
The EMA copy, ITC queues and DINO centres are training state and not included: continue
pre-training from the run's checkpoint instead.
"""


def export_hf(run: str, out: str, ema: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Export the newest checkpoint of ``run`` (run dir, checkpoints dir or ``step_*.pt``) to the
    folder ``out`` (see the module docstring); returns config.json's content.

    The checkpoint is read through :func:`semmim.checkpoint.open_checkpoint` (checksum,
    ``weights_only``). ``out`` must be new or empty unless ``overwrite`` (which replaces the
    export's files, each atomically, and leaves other files alone; config.json, holding the
    weights' checksum, is written last). ExportError / CheckpointError name the problem.
    """
    from safetensors.torch import save_file

    from semmim.checkpoint import EVAL_KEYS, file_sha256, open_checkpoint
    from semmim.model import SemMIM
    from semmim.rundir import run_dir_of, write_json, write_text
    from semmim.tokenizer import VOCAB_PATH, load_tokenizer

    _check_target(out, run, overwrite)
    state, file = open_checkpoint(run, required=EVAL_KEYS)
    if state.get("task", "pretrain") != "pretrain":
        raise ExportError(
            f"export: {file} is a {state['task']!r} fine-tuning checkpoint; --format hf exports "
            "pre-training runs (the SemMIM model)"
        )
    try:
        cfg = SemMIMConfig.from_dict(state["config"])
    except ValueError as err:
        raise ExportError(f"export: {file}: its model config does not load ({err})") from None
    model = SemMIM(cfg, load_tokenizer())  # only for the names and aliases
    aliases = tied_aliases(model)
    tensors = exported_tensors(state["model"], aliases, ema)
    expected = set(exported_tensors(model.state_dict(), aliases, ema))
    if set(tensors) != expected:
        diff = sorted(set(tensors) ^ expected)
        raise ExportError(f"export: {file}: its model state does not match its config: {diff[:6]}")
    plain = cfg.override(
        {"text.pretrained": "", "vision.pretrained": "", "fusion.pretrained_from_text": False}
    )
    os.makedirs(out, exist_ok=True)
    weights = os.path.join(out, WEIGHTS)
    _save_atomic(tensors, weights, save_file)
    load_tokenizer().save_pretrained(out)  # tokenizer.json + tokenizer_config.json (AutoTokenizer)
    with open(VOCAB_PATH, encoding="utf-8") as f:  # what load_tokenizer(DIR/vocab.txt) reads
        write_text(os.path.join(out, "vocab.txt"), f.read())
    meta = {
        "model_type": MODEL_TYPE,
        "format": 1,
        "weights": "ema" if ema else "net",
        "semmim_config": plain.to_dict(),
        "source": {
            # the run's name and the file, not the absolute path (an export is shared)
            "checkpoint": os.path.relpath(file, os.path.dirname(run_dir_of(file))),
            "step": state["step"],
            "total_steps": state.get("total_steps"),
            "pretrained": {
                "text.pretrained": cfg.text.pretrained,
                "vision.pretrained": cfg.vision.pretrained,
                "fusion.pretrained_from_text": cfg.fusion.pretrained_from_text,
            },
        },
        "files": {WEIGHTS: {"bytes": os.path.getsize(weights), "sha256": file_sha256(weights)}},
    }
    write_text(os.path.join(out, "README.md"), _model_card(plain, meta, out))
    write_json(os.path.join(out, "config.json"), meta)
    log.info("exported %d tensors of %s to %s", len(tensors), file, out)
    return meta


def _save_atomic(tensors: dict[str, torch.Tensor], path: str, save_file) -> None:
    """``save_file`` to a temp file beside ``path``, fsync'ed, renamed over ``path`` (a reader
    sees the old file or the new one; :func:`semmim.rundir.atomic_write`'s rule, for a writer
    that wants a path)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))  # fmt: skip
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt", "model_type": MODEL_TYPE})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
