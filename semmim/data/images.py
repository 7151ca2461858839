"""Image decoding: the decode errors and their skip reasons, optional decoders (SVG), the
per-process decoded-image cache and :func:`load_image` for every kind of :data:`ImageRef`."""

from __future__ import annotations

import functools
import io
import os
import re
import struct
import tarfile
from typing import Any

from PIL import Image

from semmim import synthetic
from semmim.data.records import ImageRef, SyntheticRef, TarMember
from semmim.paths import NotRegularFile, open_regular, require_regular

# What a corrupt or hostile image file can raise while Pillow opens and decodes it. Anything else is a
# bug and is not swallowed.
DECODE_ERRORS = (
    OSError,  # includes PIL.UnidentifiedImageError and truncated files
    ValueError,
    SyntaxError,  # some Pillow plugins report bad headers this way
    EOFError,
    struct.error,
    IndexError,
    Image.DecompressionBombError,  # more than 2 * Image.MAX_IMAGE_PIXELS pixels
    tarfile.TarError,  # a shard that became unreadable after listing
)


class MissingDecoder(ValueError):
    """An image needs an optional decoder that cannot be used here; the message says how to fix it."""


def image_error_reason(err: BaseException) -> str:
    """The skip reason for an image that failed to load with ``err`` (stable, so counts add up)."""
    if isinstance(err, Image.DecompressionBombError):
        return (
            f"image over the decompression-bomb limit ({2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels)"
        )
    if isinstance(err, MissingDecoder):
        return str(err)
    if isinstance(err, NotRegularFile):
        return err.reason
    return f"unreadable image ({type(err).__name__})"


# ---------------------------------------------------------------------------- optional decoders
@functools.cache
def svg_decoder_problem() -> str | None:
    """None when SVGs can be rasterised here, else the skip reason saying what is missing."""
    install = "pip install 'cairosvg>=2.7', semmim's [svg] extra"
    try:
        import cairosvg
    except ImportError:
        return f"SVG image: cairosvg not installed ({install})"
    except OSError:  # cairocffi found no libcairo
        return (
            "SVG image: cairosvg cannot load the cairo library "
            "(install it: apt-get install libcairo2)"
        )
    version = tuple(int(p) for p in re.findall(r"\d+", getattr(cairosvg, "__version__", "0"))[:2])
    if version < (2, 7):
        # Older releases fetch external resources named in an SVG (CVE-2023-27586).
        return f"SVG image: cairosvg {cairosvg.__version__} is older than 2.7 ({install})"
    return None


def missing_decoder(image: ImageRef) -> str | None:
    """The skip reason when ``image`` needs an optional decoder that is not usable, else None."""
    if isinstance(image, str) and image.lower().endswith(".svg"):
        return svg_decoder_problem()
    return None


_TAR_CACHE: dict[tuple[int, str], tarfile.TarFile] = {}


def image_cache_budget() -> int:
    """Bytes of decoded images each process keeps (``SEMMIM_IMAGE_CACHE_MB``, default 512; 0 = off)."""
    raw = os.environ.get("SEMMIM_IMAGE_CACHE_MB", "512")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"SEMMIM_IMAGE_CACHE_MB must be a number of MiB, got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"SEMMIM_IMAGE_CACHE_MB must be >= 0, got {raw!r}")
    return int(mb * 2**20)


class _ImageCache:
    """Decoded images of this process, keyed by reference and file identity (mtime, size,
    inode), up to a byte budget.

    Decoding is a pure function of the file, so a cached image is the image a new decode would
    give: caching changes speed, never a pixel. Filled first come, first kept (no eviction), so a
    dataset larger than the budget caches a fixed part of itself; per process (each DataLoader
    worker has its own). Worth it for SVGs (cairosvg takes ~60 ms per 384 px raster) and small
    datasets seen for many epochs.
    """

    def __init__(self) -> None:
        self.images: dict[Any, Image.Image] = {}
        self.bytes = 0

    def get(self, key: Any) -> Image.Image | None:
        return self.images.get(key)

    def put(self, key: Any, image: Image.Image) -> None:
        size = image.width * image.height * max(1, len(image.getbands()))
        if self.bytes + size <= image_cache_budget():
            self.images[key] = image
            self.bytes += size


_IMAGE_CACHE = _ImageCache()


def load_image(ref: ImageRef, cache: bool = True) -> Image.Image:
    """Load an image reference (file path, tar member or synthetic scene) as a decoded PIL image.

    Raises one of :data:`DECODE_ERRORS` on a missing, corrupt or oversized image, and
    :class:`MissingDecoder` when an optional decoder is not installed (the dataset turns these into
    skips; :func:`image_error_reason` names them). File and tar images are kept decoded in this
    process's cache (:class:`_ImageCache`) unless ``cache`` is False: callers must not modify the
    returned image in place.
    """
    if isinstance(ref, SyntheticRef):
        return synthetic.render(ref.seed, ref.split, ref.index, ref.size)
    if not cache:
        return _decode(ref)
    try:  # the file's identity: a rewritten file is decoded again
        st = os.stat(ref.path if isinstance(ref, TarMember) else ref)
    except OSError:
        return _decode(ref)  # raises the decoder's own error for a missing file
    key = (ref, st.st_mtime_ns, st.st_size, st.st_ino)
    cached = _IMAGE_CACHE.get(key)
    if cached is not None:
        return cached
    image = _decode(ref)
    _IMAGE_CACHE.put(key, image)
    return image


def _decode(ref: ImageRef) -> Image.Image:
    if isinstance(ref, TarMember):
        if ref.compressed:
            cache_key = (os.getpid(), ref.path)
            if cache_key not in _TAR_CACHE:
                f = open_regular(ref.path, "shard")
                try:
                    _TAR_CACHE[cache_key] = tarfile.open(ref.path, "r:*", fileobj=f)
                except BaseException:
                    f.close()
                    raise
            stream = _TAR_CACHE[cache_key].fileobj  # seekable decompressed view of the tar
            stream.seek(ref.offset)
            data = stream.read(ref.size)
        else:
            with open_regular(ref.path, "shard") as f:
                f.seek(ref.offset)
                data = f.read(ref.size)
        if len(data) != ref.size:
            raise OSError(f"truncated tar member {ref.name}")
        image = Image.open(io.BytesIO(data))
    elif ref.lower().endswith(".svg"):
        image = _rasterise_svg(ref)
    else:
        with open_regular(ref, "image") as f:
            image = Image.open(f)
            image.load()  # decode now, so corrupt files fail here and not in a transform
        return image
    image.load()
    return image


def decode_failure(ref: ImageRef) -> str | None:
    """Try to decode ``ref``: None when it loads, else the skip reason (:func:`image_error_reason`)."""
    try:
        load_image(ref, cache=False)  # a check of every image must not fill the cache
    except DECODE_ERRORS as err:
        return image_error_reason(err)
    return None


def _rasterise_svg(path: str, size: int = 384) -> Image.Image:
    problem = svg_decoder_problem()
    if problem is not None:
        raise MissingDecoder(problem)
    require_regular(path, "image")  # cairosvg opens the path itself
    import cairosvg

    # cairosvg >= 2.7 neither resolves XML entities nor fetches external resources unless unsafe=True.
    return Image.open(io.BytesIO(cairosvg.svg2png(url=path, output_width=size)))
