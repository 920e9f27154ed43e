"""Seeded synthetic views: determinism, geometry (tilt, fit), occlusion, lighting, difficulty."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from msvlad.mini.synthetic import (
    FOCAL,
    VIEW_SPECS,
    ViewSpec,
    box_overlap,
    fit_inside,
    lighting,
    synthesize_view,
    tilt_quad,
)


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
    query, easy, hard, junk = (VIEW_SPECS[k] for k in ("query", "easy", "hard", "junk"))
    assert junk.area[1] <= hard.area[0] and hard.area[1] <= easy.area[1] and junk.area[1] <= 0.1
    assert sum(hard.area) < sum(easy.area) < sum(query.area)
    assert query.occlusion_p == 0 and query.tilt < easy.tilt
    for attr in (
        "tilt",
        "occlusion_p",
        "gamma",
        "temperature",
        "shade",
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
    with pytest.raises(ValueError, match="tilt"):
        ViewSpec(area=(0.1, 0.2), tilt=85.0)
    with pytest.raises(ValueError, match="occlusion_area"):
        ViewSpec(area=(0.1, 0.2), occlusion_area=(0.3, 0.1))
    with pytest.raises(ValueError, match="gamma"):
        ViewSpec(area=(0.1, 0.2), gamma=0.5)


def test_tilt_quad_is_the_pinhole_projection_of_the_turned_crop() -> None:
    crop = (0.0, 0.0, 100.0, 50.0)  # centre (50, 25), focal 1.2 * 100
    assert np.allclose(tilt_quad(crop, 0.0, 0.0, 0.0), [[0, 0], [100, 0], [100, 50], [0, 50]])
    f, a = FOCAL * 100.0, np.deg2rad(30.0)
    expected = []
    for x, y in ((-50, -25), (50, -25), (50, 25), (-50, 25)):
        depth = f - x * np.sin(a)  # yaw about the vertical axis: Z = -X sin(a)
        expected.append([50 + f * x * np.cos(a) / depth, 25 + f * y / depth])
    got = tilt_quad(crop, 30.0, 0.0, 0.0)
    assert np.allclose(got, expected)
    # the side turned towards the camera (x > 0 here) is longer than the other: a keystone
    assert got[2, 1] - got[1, 1] > got[3, 1] - got[0, 1] > 0
    # roll alone is an in-plane rotation about the centre
    r = np.deg2rad(90.0)
    rolled = tilt_quad(crop, 0.0, 0.0, 90.0)
    x, y = -50.0, -25.0
    assert np.allclose(
        rolled[0], [50 + x * np.cos(r) - y * np.sin(r), 25 + x * np.sin(r) + y * np.cos(r)]
    )


def test_fit_inside_shrinks_about_the_centroid() -> None:
    quad = np.array([[-10.0, 0.0], [30.0, 0.0], [30.0, 20.0], [-10.0, 20.0]])  # centroid (10, 10)
    got = fit_inside(quad, 100.0, 100.0)
    assert np.allclose(got, [[0, 5], [20, 5], [20, 15], [0, 15]])  # s = 10 / 20 about (10, 10)
    inside = np.array([[1.0, 1.0], [5.0, 1.0], [5.0, 5.0], [1.0, 5.0]])
    assert np.array_equal(fit_inside(inside, 10.0, 10.0), inside)


def test_lighting_hand_values() -> None:
    img = np.full((2, 5, 3), 0.5)
    assert np.allclose(lighting(img, 2.0, 0.0, 0.0, 0.0), 0.25)
    warm = lighting(img, 1.0, 0.2, 0.0, 0.0)
    assert np.allclose(warm[..., 0], 0.6) and np.allclose(warm[..., 1], 0.5)
    assert np.allclose(warm[..., 2], 0.4)
    shaded = lighting(img, 1.0, 0.0, 0.5, 0.0)  # ramp along +x: dark at x = 0, unchanged at x = 4
    assert np.allclose(shaded[:, :, 0], [[0.25, 0.3125, 0.375, 0.4375, 0.5]] * 2)
    assert np.allclose(lighting(np.ones((2, 2, 3)), 1.0, 0.5, 0.0, 0.0)[..., 0], 1.0)  # clipped


def test_occluders_change_only_their_boxes() -> None:
    img = _photo(200, 160)
    base = dict(area=(0.5, 0.5), tilt=20.0, brightness=0.2, jpeg_quality=(100, 100))
    on = ViewSpec(**base, occlusion_p=1.0, occlusion_area=(0.2, 0.3))
    off = ViewSpec(**base, occlusion_p=0.0, occlusion_area=(0.2, 0.3))
    hit = 0
    for seed in range(6):
        a, b = (
            synthesize_view(img, on, seed, max_side=96),
            synthesize_view(img, off, seed, max_side=96),
        )
        assert (
            a.params["quad"] == b.params["quad"]
            and a.params["brightness"] == b.params["brightness"]
        )
        assert b.params["occluders"] == [] and 1 <= len(a.params["occluders"]) <= 3
        diff = np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max(-1)
        w, h = a.image.size
        mask = np.zeros((h, w), bool)
        for occ in a.params["occluders"]:
            x1, y1, x2, y2 = occ["box"]
            mask[max(0, int(y1) - 10) : int(y2) + 11, max(0, int(x1) - 10) : int(x2) + 11] = True
        assert diff[~mask].max() <= 8  # outside the boxes: JPEG noise only
        hit += diff[mask].mean() > 5
    assert hit >= 5
