"""One source file -> one clean RGB image for a converted dataset.

ImageNet's real bad files, and what happens to them:
    CMYK JPEG, grayscale JPEG, other colour modes  -> converted to RGB            (repaired, reported)
    a PNG (or other format) under a .JPEG name     -> decoded by content         (repaired, reported)
    zero-byte, truncated/corrupt, not an image     -> `BadImage(reason)`         (skipped by the caller, reported)
Images whose longer side exceeds `max_size` are shrunk (antialiased bilinear) to exactly `max_size`.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import encode_jpeg
from torchvision.transforms.v2 import functional as TF

from pipelines.sources import decode_rgb

_FORMAT_OF_EXT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}
_GRAY_MODES = {"L", "LA", "1", "I", "I;16", "F"}


class BadImage(ValueError):
    """A file that cannot become a training image; the message is the reason for the report."""


def inspect_header(data: bytes, name: str) -> tuple[str, str, list[str]]:
    """(format, mode, repairs) from the header alone; raises BadImage for empty or non-image files."""
    if not data:
        raise BadImage("zero-byte file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
    except UnidentifiedImageError:
        raise BadImage("not an image (content matches no image format)") from None
    except Exception as exc:  # PIL raises many types on malformed headers
        raise BadImage(f"unreadable image header ({type(exc).__name__}: {exc})") from None
    repairs = []
    suffix = Path(name).suffix
    expected = _FORMAT_OF_EXT.get(suffix.lower())
    if expected is not None and fmt != expected:
        repairs.append(f"{fmt} content under a {suffix} name: decoded by content")
    if mode == "CMYK":
        repairs.append("CMYK converted to RGB")
    elif mode in _GRAY_MODES:
        repairs.append(f"grayscale ({mode}) converted to RGB")
    elif mode != "RGB":
        repairs.append(f"{mode} converted to RGB")
    return fmt, mode, repairs


def shrink(img: torch.Tensor, max_size: int) -> torch.Tensor:
    """Scale (3, H, W) so that its longer side is at most `max_size` (aspect kept, antialiased)."""
    h, w = img.shape[-2:]
    if max_size <= 0 or max(h, w) <= max_size:
        return img
    r = max_size / max(h, w)
    size = [max(1, round(h * r)), max(1, round(w * r))]
    return TF.resize(img, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def load_clean(data: bytes, name: str, max_size: int) -> tuple[torch.Tensor, list[str]]:
    """Decode, repair and shrink one file: (uint8 (3, H, W) RGB, repairs made). Raises BadImage."""
    _, _, repairs = inspect_header(data, name)
    try:
        img = decode_rgb(data, name)
    except ValueError:
        raise BadImage("truncated or corrupt image data") from None
    return shrink(img, max_size), repairs


def to_jpeg(img: torch.Tensor, quality: int) -> bytes:
    return encode_jpeg(img, quality=quality).numpy().tobytes()
