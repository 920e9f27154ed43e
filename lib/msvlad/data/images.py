"""Robust image loading: always RGB, fully decoded, query crop before any resize.

- Every mode becomes RGB: grayscale/palette/CMYK are converted, 16-bit and float images are
  rescaled to 8 bits, and transparency (RGBA, LA, palette with a transparent index) is
  composited on white.
- The whole file is decoded (`img.load()`) so a truncated or corrupt file fails here, with one
  line naming it, and never later inside a batch. PIL's `ImageFile.LOAD_TRUNCATED_IMAGES` is left
  False: a silently grey-padded image would change a descriptor without notice.
- Query boxes follow revisitop: ``bbx = (x1, y1, x2, y2)`` in pixels of the original image, each
  coordinate rounded as PIL's `Image.crop` (and cirtorch) do, clipped to the image.
- EXIF orientation is not applied, as in cirtorch/revisitop (boxes refer to the stored pixels);
  INRIA Holidays' sideways photos are fixed by an explicit rotation list (`rotate_image`).
- Resizing uses PIL's bilinear or Lanczos filter (`model.resize_filter`; Lanczos is what the
  authors' code used, through torchvision's Resize with PIL's ANTIALIAS alias).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from msvlad.config import ResizeFilter
from msvlad.errors import InputError

if TYPE_CHECKING:
    import torch

_WHITE = (255, 255, 255)


class ImageLoadError(InputError):
    """An image file is missing, truncated, corrupt, or its crop box is unusable."""


def clip_bbx(bbx: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Integer crop box (x1, y1, x2, y2), rounded as PIL's crop does and clipped to the image."""
    if len(bbx) != 4:
        raise ValueError(f"bbx must have 4 numbers (x1, y1, x2, y2), got {len(bbx)}")
    values = [float(v) for v in bbx]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"bbx {tuple(values)} has a non-finite coordinate")
    x1, y1, x2, y2 = (round(v) for v in values)
    x1, x2 = min(max(x1, 0), width), min(max(x2, 0), width)
    y1, y2 = min(max(y1, 0), height), min(max(y2, 0), height)
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bbx {tuple(values)} is empty inside a {width}x{height} image")
    return x1, y1, x2, y2


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max(initial=0.0)), 255.0)
        if img.mode == "F" and arr.size and float(arr.max()) <= 1.0:
            top = 1.0
        gray = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, bbx: Sequence[float] | None = None) -> Image.Image:
    """Decode an image file to RGB, cropped to `bbx` (x1, y1, x2, y2) if given."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()  # full decode: truncation and corrupt data fail here
            img = to_rgb(im)
            if img is im:
                img = im.copy()  # detach from the file handle closed by the with-block
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        msg = " ".join(str(err).split()) or type(err).__name__
        raise ImageLoadError(f"{path}: cannot decode image ({msg})") from None
    if bbx is not None:
        try:
            box = clip_bbx(bbx, *img.size)
        except ValueError as err:
            raise ImageLoadError(f"{path}: {err}") from None
        img = img.crop(box)
    return img


def rotate_image(img: Image.Image, degrees: int | float) -> Image.Image:
    """Rotate clockwise by `degrees` (the Holidays lists' convention); 90° steps are lossless."""
    turns = float(degrees) % 360.0
    if turns == 0:
        return img
    exact = {
        90.0: Image.Transpose.ROTATE_270,  # PIL's ROTATE_* turn counter-clockwise
        180.0: Image.Transpose.ROTATE_180,
        270.0: Image.Transpose.ROTATE_90,
    }
    if turns in exact:
        return img.transpose(exact[turns])
    return img.rotate(-turns, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=_WHITE)


ResizePolicy = Literal["square", "max_side"]

# model.resize_filter name -> PIL filter (the names equal config.ResizeFilter)
RESIZE_FILTERS: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class ImageItem:
    """One image to describe: a file, an optional query box (x1, y1, x2, y2) and a rotation."""

    path: Path
    bbx: tuple[float, float, float, float] | None = None
    rotation: int = 0


def target_size(width: int, height: int, size: int, policy: ResizePolicy) -> tuple[int, int]:
    """(width, height) after resizing: size x size, or the longer side to `size` keeping aspect."""
    if policy == "square":
        return size, size
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [0, 1]."""
    import torch

    arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def load_resized(
    item: ImageItem, size: int, policy: ResizePolicy, resize_filter: ResizeFilter = "bilinear"
) -> torch.Tensor:
    """Load (crop to bbx before any resize, rotate) and resize one image to a tensor."""
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(
            f"model.resize_filter: {resize_filter!r} is not one of {list(RESIZE_FILTERS)}"
        )
    img = load_image(item.path, item.bbx)
    if item.rotation:
        img = rotate_image(img, item.rotation)
    size_wh = target_size(img.width, img.height, size, policy)
    return to_tensor(img.resize(size_wh, RESIZE_FILTERS[resize_filter]))


OnError = Literal["raise", "skip", "zero"]


def load_batch(
    items: Sequence[ImageItem],
    size: int,
    policy: ResizePolicy,
    on_error: OnError = "raise",
    resize_filter: ResizeFilter = "bilinear",
) -> tuple[torch.Tensor | None, np.ndarray]:
    """Load and resize images into one (B, 3, H, W) batch, with a policy for unreadable ones.

    on_error: "raise" re-raises the first `ImageLoadError`; "skip" leaves a failed image out of
    the batch; "zero" puts a zero image in its place (square `size`, the shape the square policy
    gives). Returns the batch (None when nothing loaded) and a bool mask of the items that loaded.
    """
    import logging

    import torch

    ok = np.zeros(len(items), dtype=bool)
    tensors = []
    for i, item in enumerate(items):
        try:
            tensors.append(load_resized(item, size, policy, resize_filter))
            ok[i] = True
        except ImageLoadError as err:
            if on_error == "raise":
                raise
            logging.getLogger(__name__).warning("%s: %s", on_error, err)
            if on_error == "zero":
                tensors.append(torch.zeros(3, size, size))
    return (torch.stack(tensors) if tensors else None), ok
