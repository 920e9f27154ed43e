"""Drawing primitives shared by the report figures and the explorers: colours, thumbnails, labels.

The bottom of `msvlad.report`'s plotting: `figures` and `explorers` both draw with these, and
neither needs the other for it.
"""

from __future__ import annotations

import logging
import os
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

if TYPE_CHECKING:
    from msvlad.data.testsets import RetrievalDataset

log = logging.getLogger(__name__)

COLORS: dict[str, str] = {
    "positive": "#2ca02c",
    "negative": "#d62728",
    "junk": "#9e9e9e",
    "query": "#1f77b4",
}
SETUP_COLORS: dict[str, str] = {
    "easy": "#8dd3c7",
    "medium": "#80b1d3",
    "hard": "#fb8072",
    "all": "#80b1d3",
}
KIND_COLORS: dict[str, str] = {"hard": "#c44e52", "semi-hard": "#dd8452"}  # miner triplet kinds
BORDER = 4.0  # border line width (points) around thumbnails
THUMB = 192  # longest side of a thumbnail (pixels)
DPI = 120


def thumbnail(
    path: str | os.PathLike,
    bbx: Sequence[float] | None = None,
    rotation: float = 0,
    size: int = THUMB,
) -> np.ndarray:
    """RGB thumbnail (longest side `size`) of an image , cropped and rotated; grey if unreadable."""
    from msvlad.data.images import ImageLoadError, load_image, rotate_image

    try:
        img = rotate_image(load_image(path, bbx), rotation) if rotation else load_image(path, bbx)
    except (ImageLoadError, OSError) as err:
        log.warning("thumbnail: %s", err)
        return np.full((size, size, 3), 200, dtype=np.uint8)
    img.thumbnail((size, size), Image.BILINEAR)
    return np.asarray(img)


def show_thumbnail(ax: Axes, image: np.ndarray, color: str, title: str) -> None:
    """Draw a thumbnail with a coloured border (the axes spines) and a small title."""
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_edgecolor(color)
        spine.set_linewidth(BORDER)
    ax.set_title(title, fontsize=7.5)


def message_figure(message: str, title: str | None = None) -> Figure:
    """A figure that only says `message` (what a plot shows when it has nothing to draw)."""
    fig = Figure(figsize=(6, 1.6))
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=11)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def rotation_of(dataset: RetrievalDataset, name: str) -> float:
    """Rotation (degrees clockwise) a dataset lists for an image (Holidays fixes), else 0."""
    return float((getattr(dataset, "rotations", None) or {}).get(name, 0))


def wrap(text: str, width: int, lines: int = 2) -> str:
    """`text` wrapped at `width` characters, at most `lines` lines (an ellipsis marks the cut)."""
    return "\n".join(textwrap.wrap(text, width, max_lines=lines, placeholder="…")) or text


def shorten(text: str, width: int) -> str:
    """`text` cut to `width` characters, an ellipsis marking the cut (labels in tight places)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def relevance_legend(fig: Figure) -> None:
    """The ranked lists' colour key (query, positive, negative, junk) under the figure."""
    fig.legend(
        handles=[
            Patch(facecolor="white", edgecolor=COLORS[k], linewidth=2, label=k)
            for k in ("query", "positive", "negative", "junk")
        ],
        loc="outside lower center",
        ncols=4,
        frameon=False,
        fontsize=8,
    )
