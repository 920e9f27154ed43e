"""Seeded synthetic views: determinism, geometry of the returned quad/box, difficulty ranges."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from msvlad.mini.synthetic import VIEW_SPECS, ViewSpec, box_overlap, synthesize_view


def _photo(w: int = 160, h: int = 120) -> Image.Image:
    """A structured test image: gradients plus a bright square, so views differ visibly."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], axis=-1).astype(np.uint8)
    arr[30:60, 50:90] = 255
    return Image.fromarray(arr)


@pytest.mark.parametrize("level", sorted(VIEW_SPECS))
def test_same_seed_same_bytes_other_seed_differs(level: str) -> None:
    img = _photo()
    a = synthesize_view(img, VIEW_SPECS[level], 7, max_side=64)
    b = synthesize_view(img, VIEW_SPECS[level], 7, max_side=64)
    c = synthesize_view(img, VIEW_SPECS[level], 8, max_side=64)
    assert a.image.tobytes() == b.image.tobytes() and a.params == b.params
    assert a.image.tobytes() != c.image.tobytes()
    assert max(a.image.size) == 64 and a.image.mode == "RGB"


@pytest.mark.parametrize("level", ["easy", "hard", "junk"])
def test_quad_inside_image_and_box_bounds_quad(level: str) -> None:
    img = _photo()
    for seed in range(20):
        v = synthesize_view(img, VIEW_SPECS[level], seed, max_side=48)
        quad = np.array(v.quad)
        assert (
            (quad >= -1e-6).all()
            and (quad[:, 0] <= 160 + 1e-6).all()
            and (quad[:, 1] <= 120 + 1e-6).all()
        )
        x1, y1, x2, y2 = v.box
        assert np.isclose([x1, y1, x2, y2], [*quad.min(0), *quad.max(0)]).all()
        # The drawn crop area respects the spec (before perspective jitter).
        cx1, cy1, cx2, cy2 = v.params["crop"]
        frac = (cx2 - cx1) * (cy2 - cy1) / (160 * 120)
        lo, hi = VIEW_SPECS[level].area
        assert lo * 0.98 <= frac <= hi * 1.02 or (cx2 - cx1) >= 159.9 or (cy2 - cy1) >= 119.9


def test_view_shows_the_crop_content() -> None:
    """With no jitter, a view is the resized crop: compare with PIL crop+resize independently."""
    img = _photo()
    spec = ViewSpec(area=(0.25, 0.25), aspect=(1.0, 1.0), jpeg_quality=(100, 100))
    v = synthesize_view(img, spec, 3, max_side=60)
    x1, y1, x2, y2 = v.box
    ref = img.crop(tuple(round(c) for c in (x1, y1, x2, y2))).resize(
        v.image.size, Image.Resampling.BICUBIC
    )
    diff = np.abs(np.asarray(v.image, dtype=np.float32) - np.asarray(ref, dtype=np.float32))
    assert diff.mean() < 6.0
    assert (x2 - x1) * (y2 - y1) == pytest.approx(0.25 * 160 * 120, rel=1e-6)


def test_source_to_view_maps_quad_corners_to_view_corners() -> None:
    v = synthesize_view(_photo(), VIEW_SPECS["hard"], 11, max_side=50)
    w, h = v.image.size
    got = v.source_to_view(np.array(v.quad))
    assert np.allclose(got, [[0, 0], [w, 0], [w, h], [0, h]], atol=1e-6)


def test_roi_constrains_crop_overlap() -> None:
    img = _photo(200, 200)
    roi = (20.0, 20.0, 100.0, 100.0)
    for seed in range(10):
        v = synthesize_view(img, VIEW_SPECS["easy"], seed, max_side=32, roi=roi)
        assert (
            box_overlap(tuple(v.params["crop"]), roi) >= VIEW_SPECS["easy"].min_roi_overlap - 1e-3
        )


def test_levels_are_ordered_by_strength() -> None:
    easy, hard, junk = (VIEW_SPECS[k] for k in ("easy", "hard", "junk"))
    assert junk.area[1] <= hard.area[0] and hard.area[1] <= easy.area[1] and junk.area[1] <= 0.1
    assert sum(hard.area) < sum(easy.area)
    for attr in (
        "perspective",
        "rotation",
        "brightness",
        "contrast",
        "saturation",
        "hue",
        "grayscale_p",
        "blur_p",
    ):
        assert getattr(hard, attr) > getattr(easy, attr), attr
    assert hard.jpeg_quality[1] < easy.jpeg_quality[1]


def test_box_overlap_hand_values() -> None:
    assert box_overlap((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(0.25)
    assert box_overlap((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert box_overlap((1, 1, 2, 2), (0, 0, 5, 5)) == 1.0


def test_bad_spec_and_args_fail_with_names() -> None:
    with pytest.raises(ValueError, match="area"):
        ViewSpec(area=(0.5, 0.2))
    with pytest.raises(ValueError, match="jpeg_quality"):
        ViewSpec(area=(0.1, 0.2), jpeg_quality=(0, 50))
    with pytest.raises(ValueError, match="max_side"):
        synthesize_view(_photo(), VIEW_SPECS["easy"], 0, max_side=2)
