"""Seeded synthetic views of a photo (crop, perspective, rotation, colour, blur, JPEG); PIL + numpy.

A view is sampled as a quadrilateral inside the source image: an axis-aligned crop of a given
area fraction and aspect, its corners jittered (perspective) and rotated about its centre, then
shrunk until it fits the image. The quad is warped onto an output rectangle by a projective
transform, so the view has no empty borders. Photometric changes (brightness, contrast,
saturation, hue, greyscale, blur) and a JPEG re-encode follow. Everything is drawn from one
`numpy.random.Generator` built from the seed, so the same (image, spec, seed) always gives the
same bytes.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels


@dataclass(frozen=True)
class ViewSpec:
    """Ranges of the random view parameters for one difficulty level."""

    area: tuple[float, float]  # crop area as a fraction of the source area
    aspect: tuple[float, float] = (3 / 4, 4 / 3)  # crop width/height ratio, drawn log-uniformly
    perspective: float = 0.0  # max corner displacement, as a fraction of the crop side
    rotation: float = 0.0  # max absolute rotation in degrees
    brightness: float = 0.0  # factor drawn in [1 - b, 1 + b]
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # hue shift in [-h, h] of a full turn
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.5, 1.5)
    jpeg_quality: tuple[int, int] = (75, 95)
    min_roi_overlap: float = 0.0  # with a roi: min fraction of the crop that lies inside the roi

    def __post_init__(self) -> None:
        lo, hi = self.area
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"area: need 0 < lo <= hi <= 1, got {self.area}")
        if not 0 < self.aspect[0] <= self.aspect[1]:
            raise ValueError(f"aspect: need 0 < lo <= hi, got {self.aspect}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality: need 1 <= lo <= hi <= 100, got {self.jpeg_quality}")


# Difficulty levels, tuned so that an off-the-shelf ImageNet CNN + GeM scores Easy > Medium > Hard
# on mini-test, none saturated. "easy": a 6-25 % crop of the object with moderate geometric and
# colour changes; "hard": a 4-12 % crop with strong perspective, rotation, colour, greyscale, blur
# and JPEG damage; "junk": tiny crops (0.5-2 % of the image), barely recognisable, which the
# revisited protocol ignores; "query": mild changes, for the extra synthetic queries.
VIEW_SPECS: dict[str, ViewSpec] = {
    "easy": ViewSpec(
        area=(0.06, 0.25),
        perspective=0.2,
        rotation=10.0,
        brightness=0.35,
        contrast=0.35,
        saturation=0.4,
        hue=0.04,
        grayscale_p=0.15,
        blur_p=0.2,
        blur_sigma=(0.5, 1.5),
        jpeg_quality=(50, 85),
        min_roi_overlap=0.5,
    ),
    "hard": ViewSpec(
        area=(0.04, 0.12),
        aspect=(0.5, 2.0),
        perspective=0.4,
        rotation=30.0,
        brightness=0.5,
        contrast=0.5,
        saturation=0.7,
        hue=0.12,
        grayscale_p=0.4,
        blur_p=0.5,
        blur_sigma=(1.0, 2.5),
        jpeg_quality=(20, 50),
        min_roi_overlap=0.5,
    ),
    "junk": ViewSpec(
        area=(0.005, 0.02),
        aspect=(0.6, 1.6),
        perspective=0.2,
        rotation=15.0,
        brightness=0.3,
        contrast=0.3,
        saturation=0.3,
        hue=0.05,
        grayscale_p=0.2,
        blur_p=0.2,
        blur_sigma=(0.5, 1.5),
        jpeg_quality=(40, 80),
        min_roi_overlap=0.5,
    ),
    "query": ViewSpec(
        area=(0.7, 1.0),
        perspective=0.05,
        rotation=2.0,
        brightness=0.15,
        contrast=0.15,
        saturation=0.15,
        hue=0.01,
        jpeg_quality=(85, 95),
    ),
}


@dataclass(frozen=True)
class View:
    """A synthetic view, the quad and box it covers in the source, and the drawn parameters."""

    image: Image.Image
    quad: tuple[
        tuple[float, float], ...
    ]  # 4 source corners (tl, tr, br, bl) mapped to the view corners
    box: Box  # axis-aligned bounding box of `quad` in source pixels
    params: dict  # plain JSON-ready record of every drawn value

    def source_to_view(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 2) source pixel coordinates into this view's pixel coordinates."""
        w, h = self.image.size
        dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
        hmat = _homography(np.asarray(self.quad, dtype=np.float64), dst)
        pts = np.c_[np.asarray(points, dtype=np.float64), np.ones(len(points))] @ hmat.T
        return pts[:, :2] / pts[:, 2:3]


def synthesize_view(
    image: Image.Image,
    spec: ViewSpec,
    seed: int,
    *,
    max_side: int = 384,
    roi: Box | None = None,
) -> View:
    """Draw one seeded view of `image` following `spec`; pure and byte-deterministic in the seed.

    Args:
        image: source photo (converted to RGB).
        spec: parameter ranges of the difficulty level.
        seed: any non-negative int; the same seed gives the same view.
        max_side: longest side of the returned view in pixels.
        roi: optional region of interest (x1, y1, x2, y2) in source pixels; the crop is drawn so
        that
            at least `spec.min_roi_overlap` of its area lies inside it.
    """
    if max_side < 8:
        raise ValueError(f"max_side: must be >= 8, got {max_side}")
    rng = np.random.default_rng(seed)
    src = image.convert("RGB")
    W, H = src.size
    crop = _sample_crop(rng, W, H, spec, roi)
    quad = _jitter_quad(rng, crop, spec, W, H)
    x1, y1, x2, y2 = crop
    cw, ch = x2 - x1, y2 - y1
    scale = max_side / max(cw, ch)
    out_w, out_h = max(1, round(cw * scale)), max(1, round(ch * scale))
    dst = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], dtype=np.float64)
    # Downscale the source first when the view is much smaller, so bicubic sampling does not alias.
    factor = int(min(cw / out_w, ch / out_h))
    if factor >= 2:
        src = src.reduce(factor)
    quad_src = quad * np.array([src.width / W, src.height / H])
    hmat = _homography(dst, quad_src)  # view -> source pixels, as PIL's PERSPECTIVE expects
    coeffs = (hmat / hmat[2, 2]).ravel()[:8]
    view = src.transform(
        (out_w, out_h),
        Image.Transform.PERSPECTIVE,
        tuple(float(c) for c in coeffs),
        resample=Image.Resampling.BICUBIC,
    )
    view, photo = _photometric(rng, view, spec)
    quality = int(rng.integers(spec.jpeg_quality[0], spec.jpeg_quality[1] + 1))
    buf = io.BytesIO()
    view.save(buf, format="JPEG", quality=quality)
    view = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    xs, ys = quad[:, 0], quad[:, 1]
    box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
    params = {
        "seed": int(seed),
        "crop": [round(float(v), 3) for v in crop],
        "quad": [[round(float(x), 3), round(float(y), 3)] for x, y in quad],
        "size": [out_w, out_h],
        "jpeg_quality": quality,
        **photo,
    }
    return View(view, tuple((float(x), float(y)) for x, y in quad), box, params)


def box_overlap(inner: Box, outer: Box) -> float:
    """Fraction of the area of `inner` that lies inside `outer`."""
    ix = max(0.0, min(inner[2], outer[2]) - max(inner[0], outer[0]))
    iy = max(0.0, min(inner[3], outer[3]) - max(inner[1], outer[1]))
    area = max(1e-12, (inner[2] - inner[0]) * (inner[3] - inner[1]))
    return ix * iy / area


# -------------------------------------------------------------------------------- sampling helpers


def _sample_crop(rng: np.random.Generator, W: int, H: int, spec: ViewSpec, roi: Box | None) -> Box:
    """Axis-aligned crop with the drawn area/aspect, inside the image, near the roi if given."""
    log_lo, log_hi = np.log(spec.aspect[0]), np.log(spec.aspect[1])
    best: Box | None = None
    for _ in range(30):
        area = rng.uniform(*spec.area) * W * H
        aspect = float(np.exp(rng.uniform(log_lo, log_hi)))
        cw = min(W, np.sqrt(area * aspect))
        ch = min(H, np.sqrt(area / aspect))
        if roi is None:
            cx = rng.uniform(cw / 2, W - cw / 2)
            cy = rng.uniform(ch / 2, H - ch / 2)
        else:
            rx1, ry1, rx2, ry2 = roi
            cx = np.clip(rng.uniform(rx1, rx2), cw / 2, W - cw / 2)
            cy = np.clip(rng.uniform(ry1, ry2), ch / 2, H - ch / 2)
        crop = (float(cx - cw / 2), float(cy - ch / 2), float(cx + cw / 2), float(cy + ch / 2))
        if roi is None or box_overlap(crop, roi) >= spec.min_roi_overlap:
            return crop
        if best is None or box_overlap(crop, roi) > box_overlap(best, roi):
            best = crop
    assert best is not None
    return best


def _jitter_quad(rng: np.random.Generator, crop: Box, spec: ViewSpec, W: int, H: int) -> np.ndarray:
    """Crop corners, jittered and rotated about the centre, shrunk to fit inside the image."""
    x1, y1, x2, y2 = crop
    cw, ch = x2 - x1, y2 - y1
    quad = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)
    quad += rng.uniform(-1, 1, size=(4, 2)) * spec.perspective * np.array([cw, ch]) / 2
    theta = np.deg2rad(rng.uniform(-spec.rotation, spec.rotation))
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    quad = (quad - centre) @ rot.T + centre
    # Largest s <= 1 so that centre + s * (corner - centre) lies inside [0, W] x [0, H].
    s = 1.0
    for px, py in quad - centre:
        for d, lo, hi, c in ((px, 0.0, W, centre[0]), (py, 0.0, H, centre[1])):
            if d > 0:
                s = min(s, (hi - c) / d)
            elif d < 0:
                s = min(s, (lo - c) / d)
    return centre + max(s, 0.0) * (quad - centre)


def _homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """3x3 projective matrix mapping the 4 `src` points onto the 4 `dst` points."""
    a = []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    sol = np.linalg.solve(np.array(a, dtype=np.float64), dst.reshape(-1).astype(np.float64))
    return np.append(sol, 1.0).reshape(3, 3)


def _photometric(
    rng: np.random.Generator, img: Image.Image, spec: ViewSpec
) -> tuple[Image.Image, dict]:
    """Colour jitter in a fixed order, then optional greyscale and blur; return the drawn values."""
    b = float(rng.uniform(1 - spec.brightness, 1 + spec.brightness))
    c = float(rng.uniform(1 - spec.contrast, 1 + spec.contrast))
    s = float(rng.uniform(1 - spec.saturation, 1 + spec.saturation))
    hue = float(rng.uniform(-spec.hue, spec.hue))
    gray = bool(rng.random() < spec.grayscale_p)
    blur = float(rng.uniform(*spec.blur_sigma)) if rng.random() < spec.blur_p else 0.0
    img = ImageEnhance.Brightness(img).enhance(b)
    img = ImageEnhance.Contrast(img).enhance(c)
    img = ImageEnhance.Color(img).enhance(s)
    if hue:
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + round(hue * 256)) % 256
        img = Image.frombytes("HSV", img.size, hsv.tobytes()).convert("RGB")
    if gray:
        img = img.convert("L").convert("RGB")
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    record = {
        "brightness": round(b, 4),
        "contrast": round(c, 4),
        "saturation": round(s, 4),
        "hue": round(hue, 4),
        "grayscale": gray,
        "blur_sigma": round(blur, 4),
    }
    return img, record


def spec_record(spec: ViewSpec) -> dict:
    """Plain JSON-ready dict of a spec's ranges (for provenance records)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(spec).items()}
