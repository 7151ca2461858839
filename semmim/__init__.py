"""semmim: SemMIM vision-language pre-training (ALBEF + semantic masked image modelling).

    from semmim import SemMIM, SemMIMConfig, from_preset
    model = SemMIM(from_preset("tiny"))

The model (and torch) is imported lazily so ``import semmim`` stays light.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from semmim.model import SemMIM

__version__ = "0.1.0"
__all__ = ["SemMIM", "SemMIMConfig", "from_preset", "__version__"]


class _SourceCheckoutFinder:
    """Resolves ``semmim.kernels`` and ``semmim._C`` when ``semmim`` is the source folder.

    From the clone root Python imports the source folder ``semmim/`` (the working directory is
    first on ``sys.path``), not the installed package. The installed package holds the
    repository's top-level ``kernels/`` as ``semmim.kernels`` (setup.py's ``package_dir``) and the
    compiled ``semmim._C``; the source folder holds neither. This finder maps ``semmim.kernels``
    to the clone's ``kernels/`` (the same clone as the source being imported) and ``semmim._C``,
    when no build sits beside the source (``pip install -e .`` builds it there), to the one the
    installed ``semmim`` distribution recorded. It answers for those two names only, and never
    imports ``kernels`` as a top-level name (PyPI's unrelated ``kernels`` package owns it).
    A plain class with ``find_spec`` (the meta-path protocol): ``importlib.abc`` costs ~25 ms.
    """

    def __init__(self, package_dir: Path, kernels_dir: Path) -> None:
        self.package_dir = package_dir
        self.kernels_dir = kernels_dir

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname == "semmim.kernels":
            return importlib.util.spec_from_file_location(
                fullname,
                self.kernels_dir / "__init__.py",
                submodule_search_locations=[str(self.kernels_dir)],
            )
        if fullname == "semmim._C" and not self._built_beside():
            built = _installed_extension()
            if built is None:
                raise ImportError(
                    "semmim._C: the source folder has no build and no installed semmim "
                    "distribution records one; run `pip install .` or `pip install -e .`",
                    name=fullname,
                )
            return importlib.util.spec_from_file_location(fullname, built)
        return None

    def _built_beside(self) -> bool:
        return any(
            (self.package_dir / f"_C{suffix}").exists()
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
        )


def _installed_extension() -> Path | None:
    """The ``semmim/_C*`` file the installed ``semmim`` distribution recorded (its RECORD), found
    without importing the installed package; None when none is installed or it has no build."""
    from importlib import metadata

    # every "semmim" on sys.path in order: the clone root itself comes first from the clone root,
    # and its semmim.egg-info (written there by any build) lists sources, not the extension
    for dist in metadata.distributions(name="semmim"):
        for file in dist.files or ():
            parts = Path(str(file)).parts
            if len(parts) == 2 and parts[0] == "semmim" and parts[1].startswith("_C."):
                located = Path(str(dist.locate_file(file)))
                if located.exists() and located.name.endswith(
                    tuple(importlib.machinery.EXTENSION_SUFFIXES)
                ):
                    return located
    return None


def _map_source_checkout() -> None:
    """Install :class:`_SourceCheckoutFinder` when this is the source folder of a clone (no
    ``kernels`` subpackage here, the clone's ``kernels/`` beside it)."""
    here = Path(__file__).resolve().parent
    kernels_dir = here.parent / "kernels"
    if (here / "kernels").is_dir() or not (kernels_dir / "__init__.py").is_file():
        return  # the installed package, or a folder that is not a clone: nothing to map
    if not any(isinstance(f, _SourceCheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourceCheckoutFinder(here, kernels_dir))


_map_source_checkout()

from semmim.config import SemMIMConfig, from_preset  # noqa: E402


def __getattr__(name: str) -> Any:
    if name == "SemMIM":
        from semmim.model import SemMIM

        return SemMIM
    raise AttributeError(f"module 'semmim' has no attribute {name!r}")
