"""Downstream tasks on a pre-trained SemMIM checkpoint (issue 11): data in the real formats.

So far: the retrieval split loader (:mod:`semmim.downstream.retrieval_data`).
"""

from semmim.downstream.retrieval_data import RetrievalImage, RetrievalSplit, load_retrieval_split

__all__ = ["RetrievalImage", "RetrievalSplit", "load_retrieval_split"]
