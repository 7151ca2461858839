"""semmim.kernels: the hot ops of SemMIM, each with a PyTorch reference and faster backends.

Public ops dispatch through :mod:`semmim.kernels.registry` (explicit ``backend=`` ->
``SEMMIM_BACKEND`` -> the first backend that can run). ``python -m semmim.kernels.info`` prints
which backend can run where, and why not.
"""

from .cross_attention import cross_attention
from .masked_gather import masked_gather, masked_scatter_fill
from .prototype_cross_entropy import prototype_cross_entropy
from .registry import BACKENDS, OPS, get_op
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
    "topk_mask",
]
