"""semmim: SemMIM vision-language pre-training (ALBEF + semantic masked image modelling).

    from semmim import SemMIMConfig, build_model, from_preset
    model = build_model(from_preset("tiny"))   # a SemMIM with the shipped tokenizer

The model (and torch) is imported lazily so ``import semmim`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from semmim.config import SemMIMConfig, from_preset

if TYPE_CHECKING:
    from semmim.model import SemMIM, build_model

__version__ = "0.1.0"
__all__ = ["SemMIM", "SemMIMConfig", "build_model", "from_preset", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("SemMIM", "build_model"):
        import semmim.model

        return getattr(semmim.model, name)
    raise AttributeError(f"module 'semmim' has no attribute {name!r}")
