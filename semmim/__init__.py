"""semmim: SemMIM vision-language pre-training (ALBEF + semantic masked image modelling).

    from semmim import SemMIM, SemMIMConfig, from_preset
    model = SemMIM(from_preset("tiny"))

The model (and torch) is imported lazily so ``import semmim`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from semmim.config import SemMIMConfig, from_preset

if TYPE_CHECKING:
    from semmim.model import SemMIM

__version__ = "0.1.0"
__all__ = ["SemMIM", "SemMIMConfig", "from_preset", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "SemMIM":
        from semmim.model import SemMIM

        return SemMIM
    raise AttributeError(f"module 'semmim' has no attribute {name!r}")
