"""The caption tokenizer: BERT WordPiece (uncased) from the vocabulary shipped in semmim/assets.

The vocabulary is bert-base-uncased's (as carried by MiniLM-L6-H384-uncased), so pretrained
BERT-family text weights see the token ids they were trained with. Nothing is downloaded.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

from transformers import BertTokenizerFast, PreTrainedTokenizerBase

__all__ = ["VOCAB_PATH", "load_tokenizer"]

VOCAB_PATH = Path(__file__).resolve().parent / "assets" / "vocab.txt"


@functools.lru_cache(maxsize=4)
def load_tokenizer(vocab_path: str | None = None) -> PreTrainedTokenizerBase:
    """BertTokenizerFast (lower-casing) over ``vocab_path`` (default: the shipped vocab.txt).

    Cached: every model shares one instance per vocabulary file.
    """
    path = str(vocab_path or VOCAB_PATH)
    if not Path(path).is_file():
        raise ValueError(f"vocab_path: no vocabulary file at {path}")
    # transformers 5 takes the file as `vocab`, 4.x as `vocab_file`.
    key = (
        "vocab"
        if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters
        else "vocab_file"
    )
    return BertTokenizerFast(**{key: path}, do_lower_case=True)
