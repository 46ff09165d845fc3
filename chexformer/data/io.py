"""Decode any image file, apply the one intensity rule, return 8-bit grey.

In: a path or the bytes of a file: anything Pillow reads (8/16/32-bit and float grey, palette,
alpha, CMYK, ...) and DICOM through pydicom (modality LUT, VOI LUT / window, MONOCHROME1
inversion). Out: a Pillow RGB image with R = G = B, for :mod:`chexformer.data.datasets`
(training and evaluation), :mod:`chexformer.inference` (prediction, the web service) and the
folder scan's verification (:mod:`chexformer.data.scan`). Every failure is an
:class:`ImageReadError` naming the file and the reason.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

log = logging.getLogger(__name__)

__all__ = [
    "DICOM_EXTENSIONS",
    "INTENSITY_PERCENTILES",
    "ImageReadError",
    "decode",
    "grey_image",
    "has_dicom_magic",
    "load_image",
    "read_bytes",
    "standardize_intensity",
]

DICOM_EXTENSIONS = frozenset({".dcm", ".dicom"})


class ImageReadError(Exception):
    """An image file that cannot be decoded; ``str()`` is ``"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(path, reason)  # args kept so the exception pickles across processes
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def load_image(path: str | os.PathLike, *, size_hint: int | None = None) -> Image.Image:
    """Read any image Pillow or pydicom can decode and return it through the intensity rule.

    **The intensity rule** (one for every format, so the same picture gives the same pixels
    whether it arrives as 8-bit or 16-bit PNG/TIFF, JPEG or DICOM):

    1. decode to grey values at the file's own depth: 8/16/32-bit and float grey as stored,
       colour as luma (ITU-R 601); DICOM: modality LUT (or RescaleSlope/Intercept), then its first
       VOI LUT or window when it has one, MONOCHROME1 negated so that bone is bright;
    2. map the image's own 0.5th..99.5th percentiles linearly to 0..255 and clip
       (:func:`standardize_intensity`): no format is used "as is" and no bit depth is assumed.

    The result is 8-bit grey, returned as RGB with R = G = B. EXIF orientation is applied; of a
    multi-frame DICOM the first frame is used. Pixels are fully decoded here, so truncated files
    fail here.

    Args:
        size_hint: side the caller will resize to; lets JPEG decode at a reduced scale (never
            below this size), which is several times faster for full-resolution radiographs.

    Raises:
        ImageReadError: for every failure, naming the file and the reason.
    """
    path = Path(path)
    return decode(read_bytes(path), path, size_hint=size_hint)


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path``; a missing, unreadable or empty file is an :class:`ImageReadError`."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file: {exc.strerror or exc}") from None
    if not data:
        raise ImageReadError(path, "empty file (0 bytes)")
    return data


def has_dicom_magic(data: bytes) -> bool:
    """True when ``data`` (at least its first 132 bytes) carries the DICOM preamble's ``DICM``."""
    return data[128:132] == b"DICM"


def _is_dicom(path: Path, data: bytes) -> bool:
    return path.suffix.lower() in DICOM_EXTENSIONS or has_dicom_magic(data)


def decode(data: bytes, path: Path, *, size_hint: int | None = None, verify_only: bool = False) -> Image.Image | None:
    """Decode ``data`` (the bytes of ``path``); with ``verify_only`` decode as cheaply as possible
    (JPEG at 1/8 scale: every byte is still entropy-decoded, so truncation is still caught)."""
    try:
        if _is_dicom(path, data):
            grey = _decode_dicom(data, path, force=path.suffix.lower() in DICOM_EXTENSIONS)
            return None if verify_only else grey_image(grey)
        img = Image.open(io.BytesIO(data))  # not a context manager: closing would free the pixels
        if img.format == "JPEG" and (verify_only or size_hint):
            img.draft(None, (1, 1) if verify_only else (size_hint, size_hint))
        img.load()
        if verify_only:
            return None
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation
            img = ImageOps.exif_transpose(img)
        return grey_image(_grey_values(img))
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image format Pillow can read (unknown or corrupt header)") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"refused as a possible decompression bomb: {exc}") from None
    except MemoryError:
        raise ImageReadError(path, "out of memory while decoding") from None
    except Exception as exc:  # any decoder error becomes one clear message
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg:
            raise ImageReadError(path, f"truncated image data ({msg})") from None
        raise ImageReadError(path, f"cannot decode image ({type(exc).__name__}: {msg})") from None


INTENSITY_PERCENTILES = (0.5, 99.5)
"""The percentiles of an image's own grey values that the intensity rule maps to 0 and 255."""

_MAX_PERCENTILE_SAMPLES = 1 << 20


def standardize_intensity(values: np.ndarray, percentiles: tuple[float, float] = INTENSITY_PERCENTILES) -> np.ndarray:
    """The intensity rule's step 2: grey values of any depth (2-D array) -> uint8.

    The image's own ``percentiles`` (of its finite values) map linearly to 0..255, clipped; a flat
    image becomes 0. Linear in the input, so ``v``, ``257 * v`` and ``16 * v + 7`` all give the
    same bytes. Large images estimate the percentiles on a regular sub-grid of at most 2**20 pixels.
    """
    arr = np.asarray(values, dtype=np.float64)
    step = max(1, int(np.ceil(np.sqrt(arr.size / _MAX_PERCENTILE_SAMPLES))))
    sample = arr[::step, ::step] if arr.ndim == 2 else arr
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return np.zeros(arr.shape, np.uint8)
    lo, hi = np.percentile(finite, percentiles)
    if hi <= lo:  # more than 99 % of the pixels share one value: fall back to the full range
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    out = (np.nan_to_num(arr, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def grey_image(values: np.ndarray) -> Image.Image:
    """Pixels already decoded -> the intensity rule's image: grey values of any depth (2-D), or
    colour (H, W, 3|4) taken as luma (ITU-R 601, alpha dropped), through
    :func:`standardize_intensity`, returned as RGB with R = G = B."""
    arr = np.asarray(values)
    if arr.ndim == 3:
        arr = _luma(arr)
    return Image.fromarray(standardize_intensity(arr), "L").convert("RGB")


def _luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3|4) colour -> (H, W) float64 grey (ITU-R 601, as Pillow's ``convert("L")``)."""
    return np.asarray(rgb[..., :3], dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;32", "I;32L", "I;32B"}


def _grey_values(img: Image.Image) -> np.ndarray:
    """Grey values of a Pillow image at its own depth: deep grey as stored, everything else
    (L, 1, P, LA, RGB, RGBA, CMYK, YCbCr, ...) through Pillow's luma conversion, alpha dropped."""
    if img.mode in _HIGH_DEPTH_MODES:
        return np.asarray(img)
    return np.asarray(img if img.mode == "L" else img.convert("L"))


def _decode_dicom(data: bytes, path: Path, force: bool) -> np.ndarray:
    """DICOM bytes -> grey values (step 1 of the intensity rule), bone bright."""
    ds = pydicom.dcmread(io.BytesIO(data), force=force)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM file has no pixel data")
    arr = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        log.debug("%s: multi-frame DICOM (%d frames); using the first frame", path, frames)
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()

    if arr.ndim == 2 and photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_modality_lut(arr, ds)
        if np.issubdtype(values.dtype, np.floating) and np.all(np.mod(values, 1) == 0):
            values = values.astype(np.int64)  # a VOI LUT indexes with integers
        try:
            values = apply_voi_lut(values, ds, index=0)
        except (ValueError, NotImplementedError, AttributeError, IndexError) as exc:
            log.debug("%s: VOI LUT / window not usable (%s); using the modality values", path, exc)
        values = np.asarray(values, dtype=np.float64)
        return -values if photometric == "MONOCHROME1" else values

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    # pydicom already converted YBR to RGB; colour -> luma (ITU-R 601), as Pillow does.
    if arr.ndim == 2:
        return np.asarray(arr, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ImageReadError(path, f"unsupported DICOM pixel layout {arr.shape} ({photometric})")
    return _luma(arr)

