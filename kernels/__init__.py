"""semmim.kernels: the hot ops of SemMIM, each with a PyTorch reference and faster backends.

Every public op takes ``backend=`` (explicit backend; else ``SEMMIM_BACKEND``; else the first
backend that can run) and ``validate=`` (False skips the checks that read tensor values on the
host). The contract is in :mod:`semmim.kernels.registry` and ``kernels/README.md``;
``record_dispatch()`` records which backend each op ran; ``python -m semmim.kernels.info``
prints which backend can run where, which one each op would pick now, and why.
"""

from .cross_attention import cross_attention
from .masked_gather import masked_gather, masked_scatter_fill
from .prototype_cross_entropy import prototype_cross_entropy
from .registry import BACKENDS, OPS, get_op, record_dispatch
from .topk_mask import gumbel_noise, topk_mask

__all__ = [
    "BACKENDS",
    "OPS",
    "cross_attention",
    "get_op",
    "gumbel_noise",
    "masked_gather",
    "masked_scatter_fill",
    "prototype_cross_entropy",
    "record_dispatch",
    "topk_mask",
]
