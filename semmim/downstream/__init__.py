"""Downstream tasks on a pre-trained SemMIM checkpoint (issue 11).

- :mod:`semmim.downstream.retrieval_data`: Karpathy / ALBEF retrieval split loader;
- :mod:`semmim.downstream.vqa_data`: VQA v2 files, the official soft accuracy, embedded questions;
- :mod:`semmim.downstream.decoder`: the captioning text decoder, KV cache, greedy / beam search;
- :mod:`semmim.downstream.models`: the VQA and captioning models;
- :mod:`semmim.downstream.caption_metrics`: pycocoevalcap metrics;
- :mod:`semmim.downstream.tasks`: the fine-tuning tasks on the training loop (``semmim finetune``).
"""

from semmim.downstream.retrieval_data import RetrievalImage, RetrievalSplit, load_retrieval_split

__all__ = ["RetrievalImage", "RetrievalSplit", "load_retrieval_split"]
