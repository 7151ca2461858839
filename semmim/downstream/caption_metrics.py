"""Captioning metrics from ``pycocoevalcap`` (``pip install semmim[caption]``).

BLEU-1..4, ROUGE-L and CIDEr run in Python; the PTB tokenizer and METEOR run Java (``java`` on
PATH; Java 17 works). Without Java, METEOR is skipped with that reason and captions are
tokenised by lower-casing and splitting off punctuation (what the PTB tokenizer's output looks
like for simple captions) instead of the PTB tokenizer. SPICE needs Stanford CoreNLP jars that
``pycocoevalcap`` downloads on first use; it runs only when they are already present, else it is
skipped with the reason. No metric is computed by code of ours.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger("semmim.caption")

__all__ = ["caption_metrics", "format_caption_table"]


_EMPTY_WHY = (
    "the decoder ended them at once (an undertrained model, or too few fine-tuning steps); "
    "check the examples and train longer"
)


def _simple_tokenize(captions: Mapping[Any, Sequence[str]]) -> dict[Any, list[str]]:
    return {
        k: [" ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", c.lower())) for c in v]
        for k, v in captions.items()
    }


def _spice_ready() -> str | None:
    """None when SPICE can run offline, else the reason it cannot."""
    import pycocoevalcap

    lib = os.path.join(os.path.dirname(pycocoevalcap.__file__), "spice", "lib")
    if not shutil.which("java"):
        return "no java on PATH"
    if not os.path.exists(os.path.join(lib, "stanford-corenlp-3.6.0.jar")):
        return "the Stanford CoreNLP 3.6.0 jars are not installed (pycocoevalcap downloads them)"
    return None


def caption_metrics(
    predictions: Mapping[Any, str],
    references: Mapping[Any, Sequence[str]],
    spice: bool = False,
) -> dict[str, Any]:
    """Corpus metrics of one predicted caption per image against its reference captions.

    Args:
        predictions: image key → generated caption.
        references: image key → reference captions (same keys).
        spice: also compute SPICE when its jars are present.

    Returns ``{"BLEU-1": …, "BLEU-4": …, "METEOR": …, "ROUGE-L": …, "CIDEr": …, "skipped":
    {metric: reason}, "tokenizer": …, "empty_captions": n}`` (values on the 0–100 scale, as
    papers report them; ``empty_captions`` counts the predictions with no word, which score 0
    and are warned about, so all-zero metrics are never left unexplained).
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise ImportError(
            "captioning metrics need pycocoevalcap: pip install 'semmim[caption]'"
        ) from None
    if set(predictions) != set(references):
        extra = sorted(set(predictions) ^ set(references))[:3]
        raise ValueError(f"predictions and references: different image keys (e.g. {extra})")
    if not predictions:
        raise ValueError("predictions: no image to score")
    empty = sum(not str(c).strip() for c in predictions.values())
    if empty:
        log.warning(
            "captioning: %d of %d generated captions are empty (they score 0 on every metric): %s",
            empty,
            len(predictions),
            _EMPTY_WHY,
        )
    java = shutil.which("java") is not None
    skipped: dict[str, str] = {}
    gts = {k: list(v) for k, v in references.items()}
    res = {k: [v] for k, v in predictions.items()}
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        wrap = lambda d: {k: [{"caption": c} for c in v] for k, v in d.items()}  # noqa: E731
        gts, res, tokenizer = tok.tokenize(wrap(gts)), tok.tokenize(wrap(res)), "PTB (Java)"
    else:
        gts, res = _simple_tokenize(gts), _simple_tokenize(res)
        tokenizer = "lower-case words (no Java for the PTB tokenizer)"
    out: dict[str, Any] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        out[f"BLEU-{n}"] = 100.0 * b
    if java:
        meteor = Meteor()
        try:
            out["METEOR"] = 100.0 * meteor.compute_score(gts, res)[0]
        finally:
            close = getattr(meteor, "close", None)
            if close is not None:
                close()
    else:
        skipped["METEOR"] = "no java on PATH (METEOR 1.5 is a Java program)"
    out["ROUGE-L"] = 100.0 * Rouge().compute_score(gts, res)[0]
    out["CIDEr"] = 100.0 * Cider().compute_score(gts, res)[0]
    if spice:
        reason = _spice_ready()
        if reason is None:
            from pycocoevalcap.spice.spice import Spice

            out["SPICE"] = 100.0 * Spice().compute_score(gts, res)[0]
        else:
            skipped["SPICE"] = reason
    else:
        skipped["SPICE"] = "not requested"
    out["skipped"] = skipped
    out["tokenizer"] = tokenizer
    out["empty_captions"] = empty
    return out


def format_caption_table(result: dict[str, Any]) -> str:
    """The caption metrics as a text table."""
    names = [k for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE") if k in result]
    lines = [
        f"captioning: {result.get('n_images', '?')} images, decoding {result.get('decoding', '')}",
        "".join(n.rjust(9) for n in names),
        "".join(f"{result[n]:9.2f}" for n in names),
    ]
    empty = result.get("empty_captions", 0)
    if empty:
        lines.append(
            f"WARNING: {empty} of {result.get('n_images', '?')} generated captions are empty "
            f"(scored 0): {_EMPTY_WHY}"
        )
    for metric, reason in result.get("skipped", {}).items():
        lines.append(f"{metric} skipped: {reason}")
    lines.append(f"tokenizer: {result.get('tokenizer', '')}")
    return "\n".join(lines)
