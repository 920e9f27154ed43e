"""What both explorers share: the thumbnail cache, the widget scaffolding and the error display.

An explorer keeps its selection as plain state changed by `select(...)`; `ExplorerBase.widget()`
builds the ipywidgets controls once, and every control change runs through `_guarded`: the new
value is applied, the view redrawn, and any error rolls the state back (so the menus keep showing
what the figure shows) and is written as one line into the widget's own error area, not only to
the log console.
"""

from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from msvlad.report.drawing import THUMB

log = logging.getLogger(__name__)

PNG_DPI = 100
JPEG_QUALITY = 88
MAX_OPTIONS = 500  # entries in a query / triplet menu (the rest stay reachable through filters)


class ThumbnailCache:
    """LRU cache of decoded thumbnails keyed by (file, crop box, rotation, size)."""

    def __init__(self, max_items: int = 2048) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple, tuple[np.ndarray, tuple[int, int]]] = OrderedDict()
        self._jpeg: OrderedDict[tuple, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Number of cached thumbnails."""
        return len(self._items)

    def get(
        self,
        path: str | os.PathLike,
        bbx: Sequence[float] | None = None,
        rotation: float = 0,
        size: int = THUMB,
    ) -> np.ndarray:
        """RGB thumbnail (longest side `size`), decoded on first use; grey if unreadable."""
        return self._entry(path, bbx, rotation, size)[0]

    def original_size(
        self, path: str | os.PathLike, bbx: Sequence[float] | None = None, rotation: float = 0
    ) -> tuple[int, int]:
        """(width, height) of the image the thumbnail was made from (after crop and rotation)."""
        return self._entry(path, bbx, rotation, THUMB)[1]

    def jpeg(
        self, path: str | os.PathLike, bbx: Sequence[float] | None = None, rotation: float = 0
    ) -> bytes:
        """The thumbnail encoded as JPEG (what a result tile shows), encoded once."""
        key = _key(path, bbx, rotation, THUMB)
        if key not in self._jpeg:
            self._jpeg[key] = encode_jpeg(self.get(path, bbx, rotation))
            if len(self._jpeg) > self.max_items:
                self._jpeg.popitem(last=False)
        return self._jpeg[key]

    def _entry(
        self, path: str | os.PathLike, bbx: Sequence[float] | None, rotation: float, size: int
    ) -> tuple[np.ndarray, tuple[int, int]]:
        key = _key(path, bbx, rotation, size)
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        entry = _decode_thumbnail(path, bbx, rotation, size)
        self._items[key] = entry
        if len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return entry


THUMBNAILS = ThumbnailCache()  # shared by every explorer of a kernel


def _key(path: str | os.PathLike, bbx: Sequence[float] | None, rotation: float, size: int) -> tuple:
    return (str(path), None if bbx is None else tuple(float(v) for v in bbx), rotation, size)


def _decode_thumbnail(
    path: str | os.PathLike, bbx: Sequence[float] | None, rotation: float, size: int
) -> tuple[np.ndarray, tuple[int, int]]:
    from msvlad.data.images import ImageLoadError, load_image, rotate_image

    try:
        img = load_image(path, bbx)
        img = rotate_image(img, rotation) if rotation else img
    except (ImageLoadError, OSError) as err:
        log.warning("thumbnail: %s", err)
        return np.full((size, size, 3), 200, dtype=np.uint8), (size, size)
    original = img.size
    img.thumbnail((size, size), Image.BILINEAR)
    return np.asarray(img), original


def encode_jpeg(image: np.ndarray) -> bytes:
    """An RGB array as JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(
        buf, format="JPEG", quality=JPEG_QUALITY
    )
    return buf.getvalue()


def png(fig: Figure) -> bytes:
    """A figure as PNG bytes (constrained layout: no second tight-bbox pass)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PNG_DPI, facecolor="white")
    return buf.getvalue()


def error_line(err: BaseException) -> str:
    """One line naming the error: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class ExplorerBase:
    """Widget scaffolding: controls, a status line, the error area and guarded callbacks.

    A subclass defines `STATE` (the attributes `select` changes), `select(**changes)`,
    `_build(widgets)` (the controls in `self.controls`, returns the box's children),
    `_sync_controls()` (options and values from the state) and `redraw()`.
    """

    STATE: tuple[str, ...] = ()
    CSS_CLASS = "msvlad-explorer"

    def __init__(self) -> None:
        self.controls: dict[str, Any] = {}
        self.errors: Any = None  # ipywidgets.Output: the last callback error, one line
        self.status: Any = None  # ipywidgets.HTML: what an action did (export paths)
        self.last_error: str | None = None
        self._widget: Any = None
        self._quiet = False

    # ---------------------------------------------------------------- to override
    def select(self, **changes: Any) -> Any:  # pragma: no cover - abstract
        """Change the selection."""
        raise NotImplementedError

    def _build(self, widgets: Any) -> list[Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _sync_controls(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def redraw(self) -> None:  # pragma: no cover - abstract
        """Draw the current selection into the widgets."""
        raise NotImplementedError

    def _control_value(self, key: str, value: Any) -> dict[str, Any]:
        """The `select` changes a control's new value stands for (override to translate)."""
        return {key: value}

    # ---------------------------------------------------------------- scaffolding
    def widget(self) -> Any:
        """The ipywidgets box, built on first use: controls, status, errors, the view."""
        if self._widget is not None:
            return self._widget
        import ipywidgets as widgets

        self.errors = widgets.Output(layout=widgets.Layout(border="0"))
        self.errors.add_class("msvlad-error")
        self.status = widgets.HTML()
        self.status.add_class("msvlad-status")
        children = self._build(widgets)
        self._quietly(self._sync_controls)
        for key, control in self.controls.items():
            if hasattr(control, "value"):
                control.observe(self._on_change(key), names="value")
        self._widget = widgets.VBox([*children[:-1], self.errors, self.status, children[-1]])
        self._widget.add_class(self.CSS_CLASS)
        self._guarded(self.redraw)
        return self._widget

    def _on_change(self, key: str) -> Callable[[dict], None]:
        def handler(change: dict) -> None:
            if self._quiet:
                return
            self._guarded(lambda: self.select(**self._control_value(key, change["new"])))

        return handler

    def _guarded(self, action: Callable[[], Any], *, redraw: bool = True) -> bool:
        """Run `action` (then resync and redraw); on an error restore the state and show it."""
        saved = {name: getattr(self, name) for name in self.STATE}
        try:
            action()
            if self._widget is not None or self.controls:
                self._quietly(self._sync_controls)
            if redraw:
                self.redraw()
        except Exception as err:  # shown in the widget: the user sees it where they clicked
            log.exception("explorer callback failed")
            for name, value in saved.items():
                setattr(self, name, value)
            self.show_error(err)
            try:
                self._quietly(self._sync_controls)
            except Exception:  # the restored state is the last one that drew
                log.exception("explorer controls could not be restored")
            return False
        self.clear_error()
        return True

    def _quietly(self, action: Callable[[], Any]) -> None:
        """Run `action` without firing the control handlers (setting options and values)."""
        self._quiet = True
        try:
            action()
        finally:
            self._quiet = False

    def show_error(self, err: BaseException) -> None:
        """Write the error as one line into the widget's error area."""
        self.last_error = error_line(err)
        if self.errors is not None:
            self.errors.outputs = (
                {"output_type": "stream", "name": "stderr", "text": f"error: {self.last_error}\n"},
            )

    def clear_error(self) -> None:
        """Empty the error area (after an action that worked)."""
        self.last_error = None
        if self.errors is not None and self.errors.outputs:
            self.errors.outputs = ()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget()._repr_mimebundle_(**kwargs)
