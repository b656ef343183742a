"""Load any image a dataset may hold as a plain 8-bit RGB ``PIL.Image``.

Every view the student and the teacher see goes through :func:`load_image`, so the odd cases
live here once: grey, 16-bit, CMYK, palette and transparent images, EXIF-rotated photos,
truncated or corrupt files and decompression bombs. Errors are :class:`ImageError` and name
the file (or the row that points at it) and what to do.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "check_model_shape",
    "ImageError",
    "ImageSource",
    "decode_base64_image",
    "image_size",
    "load_image",
    "to_rgb",
]

#: About 179 megapixels. Pillow refuses images above ``2 * Image.MAX_IMAGE_PIXELS`` on its own
#: as well; both refusals become :class:`ImageError`.
DEFAULT_MAX_PIXELS = 178_956_970

#: Longer side over shorter side a model's processor accepts: the Qwen-VL processors refuse more
#: than 200 (and a strip that thin holds nothing to answer about). Checked per row, before batching,
#: so one such image fails (or, with data.on_error=skip, drops) its own row, not its batch.
MAX_ASPECT_RATIO = 200.0

ImageSource = str | Path | bytes | Image.Image

# EXIF orientations 5-8 rotate by 90 degrees, which swaps width and height.
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_DATA_URL = re.compile(r"^data:image/[\w.+-]*;base64,", re.IGNORECASE)


class ImageError(ValueError):
    """An image cannot be used: the message names the source and what to do."""


def _label(src: object, where: str) -> str:
    """Human-readable origin of an image for error messages."""
    if isinstance(src, (str, Path)) and not _is_data_url(src):
        what = f"image file '{src}'"
    elif isinstance(src, (bytes, bytearray)):
        what = f"image bytes ({len(src)} bytes)"
    elif isinstance(src, str):
        what = "base64 image"
    else:
        what = "in-memory image"
    return f"{what} ({where})" if where else what


def _is_data_url(src: str | Path) -> bool:
    return isinstance(src, str) and _DATA_URL.match(src) is not None


def decode_base64_image(text: str, *, where: str = "") -> bytes:
    """Decode a ``data:image/...;base64,`` URL, or bare base64 text, into raw image bytes.

    Plain strings are never guessed to be base64 by :func:`load_image` (a path could look like
    base64); call this helper explicitly for bare base64, or pass a ``data:image`` URL.
    """
    payload = _DATA_URL.sub("", text.strip(), count=1)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(
            f"{_label(text, where)}: not valid base64 ({err}); pass a file path, raw bytes, "
            "or a 'data:image/<type>;base64,...' URL"
        ) from err


def _open(src: str | Path | bytes, where: str) -> Image.Image:
    """Open lazily (header only) and translate Pillow's errors into :class:`ImageError`."""
    if isinstance(src, str) and _is_data_url(src):
        src = decode_base64_image(src, where=where)
    if isinstance(src, (bytes, bytearray)):
        fp: str | Path | io.BytesIO = io.BytesIO(src)
    else:
        path = Path(src)
        if not path.is_file():
            hint = "it is a folder, not a file" if path.is_dir() else "no such file"
            raise ImageError(
                f"{_label(src, where)}: {hint}; check that the path is right and that relative "
                "paths are relative to the folder of the record file"
            )
        fp = path
    try:
        # Our own pixel limit is checked right after this on the header size; silence
        # Pillow's warning so callers do not see two messages for one cause.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as err:
        raise ImageError(
            f"{_label(src, where)}: refused as a possible decompression bomb ({err}); "
            "Pillow's own limit is Image.MAX_IMAGE_PIXELS"
        ) from err
    except UnidentifiedImageError as err:
        raise ImageError(
            f"{_label(src, where)}: not a readable image (corrupt, empty or an unsupported "
            "format); re-export it as PNG or JPEG"
        ) from err
    except OSError as err:
        raise ImageError(f"{_label(src, where)}: cannot be read ({err})") from err


def _check_pixels(size: tuple[int, int], max_pixels: int, label: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{label}: has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            f"{label}: {width}x{height} = {width * height:,} pixels exceeds max_pixels="
            f"{max_pixels:,} (a possible decompression bomb); downscale the image or raise "
            "max_pixels if you trust the file"
        )


def check_model_shape(size: tuple[int, int], *, where: str = "") -> None:
    """Refuse an image size no model processor can take: an empty side, or an aspect ratio above
    :data:`MAX_ASPECT_RATIO`.

    Raises:
        ImageError: naming ``where`` (the sample or row), the size and what to do.
    """
    width, height = size
    label = where or "image"
    if width <= 0 or height <= 0:
        raise ImageError(f"{label}: has an empty size {width}x{height}")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"{label}: {width}x{height} has an aspect ratio of {ratio:.0f}, over the {MAX_ASPECT_RATIO:.0f} the "
            "model processors accept; crop or pad the image, or drop the row"
        )


def _exif_swaps_axes(im: Image.Image) -> bool:
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block must not make the pixels unusable
        return False
    return orientation in _SWAPPING_ORIENTATIONS


def image_size(src: ImageSource, *, where: str = "") -> tuple[int, int]:
    """Return the upright ``(width, height)`` of an image by reading only its header.

    EXIF orientations that rotate by 90 degrees swap the two, so the size matches what
    :func:`load_image` returns and what evidence boxes are measured in.
    """
    if isinstance(src, Image.Image):
        im = src
        return (im.height, im.width) if _exif_swaps_axes(im) else im.size
    with _open(src, where) as im:
        return (im.height, im.width) if _exif_swaps_axes(im) else im.size


def _to_uint8(im: Image.Image) -> Image.Image:
    """Scale single-channel 16/32-bit integer or float images to 8-bit ``L``."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        scaled = arr.astype(np.float64) / 257.0  # 65535 -> 255 exactly
    elif im.mode == "I":
        # 32-bit container; Pillow opens 16-bit PNG/TIFF data into it. Treat values above
        # 255 as 16-bit data, otherwise as already 8-bit.
        arr = np.clip(arr.astype(np.float64), 0, 65535)
        scaled = arr / 257.0 if arr.max(initial=0) > 255 else arr
    else:  # "F": floats in [0, 1] are fractions, otherwise 8-bit values
        arr = np.nan_to_num(arr.astype(np.float64))
        scaled = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _has_transparency(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info


def to_rgb(im: Image.Image, *, label: str = "image") -> Image.Image:
    """Return a new 8-bit RGB image; transparent pixels are composited on white."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_uint8(im)
    if _has_transparency(im):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode == "RGB":
        return im.copy()
    try:
        # CMYK, YCbCr, L, 1 and P all have a Pillow conversion; ICC profiles are ignored.
        return im.convert("RGB")
    except (ValueError, OSError) as err:
        raise ImageError(
            f"{label}: cannot convert mode '{im.mode}' to RGB ({err}); re-export it as an 8-bit RGB PNG or JPEG"
        ) from err


def load_image(
    src: ImageSource,
    *,
    where: str = "",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Load ``src`` as an upright 8-bit RGB image that owns its pixels.

    Args:
        src: a file path, encoded image bytes, a ``data:image/...;base64,`` URL, or a PIL
            image (never modified; a converted copy is returned).
        where: the record that refers to the image (e.g. a sample id or ``file:row``),
            added to error messages.
        max_pixels: refuse images larger than this many pixels; checked on the header,
            before any pixel is decoded.

    Raises:
        ImageError: missing, unreadable, corrupt or truncated files, oversize images and
            modes that cannot become RGB.
    """
    label = _label(src, where)
    if isinstance(src, Image.Image):
        _check_pixels(src.size, max_pixels, label)
        try:  # a lazily opened PIL image decodes here
            upright = ImageOps.exif_transpose(src)
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError(f"{label}: pixel data cannot be decoded ({err})") from err
        return to_rgb(upright, label=label)
    if not isinstance(src, (str, Path, bytes, bytearray)):
        raise ImageError(
            f"{label}: unsupported image source of type {type(src).__name__}; pass a path, bytes or a PIL image"
        )
    with _open(src, where) as im:
        _check_pixels(im.size, max_pixels, label)
        try:
            im.load()
        except (OSError, SyntaxError, ValueError) as err:
            # Pillow raises OSError("image file is truncated ...") and friends here.
            raise ImageError(
                f"{label}: pixel data cannot be decoded ({err}); the file is probably "
                "truncated or corrupt, re-download or re-export it"
            ) from err
        return to_rgb(ImageOps.exif_transpose(im), label=label)
