"""Image loading: every mode to RGB, alpha on white, full decode errors, bbx crop, rotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from msvlad.data.images import ImageLoadError, clip_bbx, load_image, rotate_image


def _coord_image(w: int = 64, h: int = 48) -> Image.Image:
    """R = x, G = y, B = 7: every pixel names its own position."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x, y, np.full_like(x, 7)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def test_rgb_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "a.jpg"
    Image.new("RGB", (20, 10), (200, 30, 40)).save(p, quality=95)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (20, 10)
    assert np.abs(np.asarray(img, int) - [200, 30, 40]).max() <= 3


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    p = tmp_path / "g.png"
    Image.new("L", (5, 4), 77).save(p)
    arr = np.asarray(load_image(p))
    assert arr.shape == (4, 5, 3) and (arr == 77).all()


def test_sixteen_bit_grayscale_is_rescaled(tmp_path: Path) -> None:
    p = tmp_path / "g16.png"
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(p)
    arr = np.asarray(load_image(p))
    assert arr.shape == (3, 3, 3) and (arr == 255).all()


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    p = tmp_path / "c.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(p, quality=100)  # pure red in CMYK
    with Image.open(p) as raw:
        assert raw.mode == "CMYK"
    img = load_image(p)
    assert img.mode == "RGB"
    r, g, b = np.asarray(img, int).reshape(-1, 3).mean(0)
    assert r > 240 and g < 15 and b < 15


def test_png_alpha_composited_on_white(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    arr = np.zeros((2, 3, 4), np.uint8)
    arr[..., 0] = 200  # red channel
    arr[0, :, 3] = 0  # top row fully transparent
    arr[1, :, 3] = 255  # bottom row opaque
    arr[1, 2, 3] = 128  # one half-transparent pixel
    Image.fromarray(arr, "RGBA").save(p)
    out = np.asarray(load_image(p), int)
    assert (out[0] == 255).all()  # transparent -> white
    assert (out[1, 0] == [200, 0, 0]).all()
    assert np.abs(out[1, 2] - [200 * 128 / 255 + 255 * 127 / 255, 127, 127]).max() <= 1


def test_palette_with_transparency(tmp_path: Path) -> None:
    p = tmp_path / "p.png"
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.info["transparency"] = 0
    img.save(p, transparency=0)
    out = np.asarray(load_image(p), int)
    assert (out[0, 0] == 255).all() and (out[3, 3] == [10, 200, 30]).all()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="not found") as err:
        load_image(tmp_path / "nope.jpg")
    assert str(tmp_path / "nope.jpg") in str(err.value)


def test_truncated_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "t.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p, quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageLoadError) as err:
        load_image(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "content", [b"<html>302 Found</html>", b"\xff\xd8\xff\xe0" + b"\x00" * 50, b""]
)
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "bad.jpg"
    p.write_bytes(content)
    with pytest.raises(ImageLoadError) as err:
        load_image(p)
    assert str(p) in str(err.value) and "\n" not in str(err.value)


def test_bbx_crop_matches_coordinates(tmp_path: Path) -> None:
    p = tmp_path / "coords.png"
    _coord_image().save(p)
    crop = np.asarray(load_image(p, (10.4, 5.6, 30.5, 20.2)), int)
    # PIL/cirtorch rounding: (10, 6, 30, 20) -> 20 x 14 pixels starting at x=10, y=6
    assert crop.shape == (14, 20, 3)
    assert (crop[0, 0] == [10, 6, 7]).all() and (crop[-1, -1] == [29, 19, 7]).all()


def test_bbx_clipped_to_image_and_empty_refused(tmp_path: Path) -> None:
    p = tmp_path / "coords.png"
    _coord_image(64, 48).save(p)
    crop = np.asarray(load_image(p, [-5, -3, 100, 40]), int)
    assert crop.shape == (40, 64, 3) and (crop[0, 0] == [0, 0, 7]).all()
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(p, (70, 0, 90, 10))
    with pytest.raises(ImageLoadError, match="4 numbers"):
        load_image(p, (1, 2, 3))
    assert clip_bbx((0.5, 1.5, 2.5, 3.5), 10, 10) == (0, 2, 2, 4)  # round half to even, like PIL


@pytest.mark.parametrize("degrees,k", [(90, -1), (180, 2), (270, 1), (-90, 1), (0, 0), (360, 0)])
def test_rotate_image_clockwise(degrees: int, k: int) -> None:
    img = _coord_image(6, 4)
    out = np.asarray(rotate_image(img, degrees))
    assert np.array_equal(out, np.rot90(np.asarray(img), k=k))  # np.rot90 k>0 is counter-clockwise


def test_rotate_arbitrary_angle_expands() -> None:
    out = rotate_image(Image.new("RGB", (10, 10), (0, 0, 0)), 45)
    assert out.size[0] > 10 and out.getpixel((0, 0)) == (255, 255, 255)
