"""Seeded synthetic views of a photo that imitate a change of viewpoint; PIL + numpy.

A view is what another camera would see of the photo's (planar) scene:
- *scale*: an axis-aligned crop of a drawn area fraction and aspect (a small crop is a zoom-in, a
  crop larger than the query region a zoom-out), placed over the region of interest if given;
- *perspective*: the crop plane is turned about its centre by a drawn yaw and pitch (out-of-plane
  tilt) and in-plane roll and seen through a pinhole camera, so the crop becomes the keystone quad a
  camera looking at the scene from the side would cover; the quad is shrunk until it fits the image
  and warped onto the output rectangle by a projective transform (no empty borders);
- *occlusion*: up to three foreground blobs (bars or ellipses) filled with a blurred, darkened,
  displaced copy of the view, as out-of-focus people, poles or branches would hide the scene;
- *lighting*: gamma (time of day), white balance (colour temperature), a linear illumination ramp
  (shadow), then brightness, contrast, saturation, hue, greyscale and blur, and a JPEG re-encode.
Every value is drawn from one `numpy.random.Generator` built from the seed, in a fixed order that
does not depend on which effects are enabled, so the same (image, spec, seed) always gives the same
bytes and switching one effect off leaves the others unchanged.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels

FOCAL = 1.2  # focal length of the virtual camera, in units of the crop's longer side (~45 deg FOV)
MAX_OCCLUDERS = 3


@dataclass(frozen=True)
class ViewSpec:
    """Ranges of the random view parameters for one difficulty level."""

    area: tuple[float, float]  # crop area as a fraction of the source area
    aspect: tuple[float, float] = (3 / 4, 4 / 3)  # crop width/height ratio, drawn log-uniformly
    tilt: float = 0.0  # max out-of-plane rotation (yaw and pitch) of the virtual camera, degrees
    rotation: float = 0.0  # max absolute in-plane rotation in degrees
    occlusion_p: float = 0.0  # probability that the view has occluders
    occlusion_area: tuple[float, float] = (0.05, 0.2)  # fraction of the view they cover
    gamma: float = 1.0  # gamma drawn log-uniformly in [1 / gamma, gamma]
    temperature: float = 0.0  # white balance: red gain 1 + t, blue gain 1 - t, t in [-T, T]
    shade: float = 0.0  # depth of a linear illumination ramp, drawn in [0, shade]
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
        if not 0 <= self.tilt < 80:
            raise ValueError(f"tilt: need 0 <= tilt < 80 degrees, got {self.tilt}")
        if not 0 < self.occlusion_area[0] <= self.occlusion_area[1] < 1:
            raise ValueError(f"occlusion_area: need 0 < lo <= hi < 1, got {self.occlusion_area}")
        if self.gamma < 1:
            raise ValueError(f"gamma: need >= 1, got {self.gamma}")
        if not 0 <= self.shade < 1 or not 0 <= self.temperature < 1:
            raise ValueError(
                f"shade, temperature: need [0, 1), got {self.shade}, {self.temperature}"
            )
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality: need 1 <= lo <= hi <= 100, got {self.jpeg_quality}")


# Difficulty levels. "query": mild changes, for the extra synthetic queries. "easy": a view of
# 10-45 % of the photo (zoom in or out around the query region), up to 25 deg of tilt, sometimes
# a small occluder, daylight changes. "hard": a 4-12 % detail seen up to 45 deg from the side,
# often half hidden, dusk/warm/cold light and shadow, grey, blur and JPEG damage. "junk": 0.5-2 %
# of the photo, barely recognisable, ignored by the revisited protocol. Tuned on mini-val so that
# off-the-shelf GeM scores Easy > Medium > Hard, none saturated (docs/method.md, mini benchmark).
VIEW_SPECS: dict[str, ViewSpec] = {
    "query": ViewSpec(
        area=(0.55, 1.0),
        tilt=10.0,
        rotation=2.0,
        gamma=1.15,
        temperature=0.05,
        brightness=0.1,
        contrast=0.1,
        saturation=0.1,
        hue=0.01,
        jpeg_quality=(85, 95),
    ),
    "easy": ViewSpec(
        area=(0.1, 0.45),
        tilt=25.0,
        rotation=5.0,
        occlusion_p=0.25,
        occlusion_area=(0.03, 0.12),
        gamma=1.35,
        temperature=0.1,
        shade=0.3,
        brightness=0.25,
        contrast=0.25,
        saturation=0.3,
        hue=0.03,
        grayscale_p=0.1,
        blur_p=0.15,
        blur_sigma=(0.5, 1.2),
        jpeg_quality=(55, 90),
        min_roi_overlap=0.6,
    ),
    "hard": ViewSpec(
        area=(0.04, 0.12),
        aspect=(0.5, 2.0),
        tilt=45.0,
        rotation=15.0,
        occlusion_p=0.6,
        occlusion_area=(0.1, 0.35),
        gamma=2.0,
        temperature=0.25,
        shade=0.6,
        brightness=0.4,
        contrast=0.45,
        saturation=0.6,
        hue=0.08,
        grayscale_p=0.3,
        blur_p=0.4,
        blur_sigma=(1.0, 2.5),
        jpeg_quality=(20, 55),
        min_roi_overlap=0.6,
    ),
    "junk": ViewSpec(
        area=(0.005, 0.02),
        aspect=(0.6, 1.6),
        tilt=20.0,
        rotation=15.0,
        occlusion_p=0.3,
        gamma=1.3,
        temperature=0.1,
        shade=0.3,
        brightness=0.3,
        contrast=0.3,
        saturation=0.3,
        hue=0.05,
        grayscale_p=0.2,
        blur_p=0.2,
        jpeg_quality=(40, 80),
        min_roi_overlap=0.5,
    ),
}


@dataclass(frozen=True)
class View:
    """A synthetic view, the quad and box it covers in the source, and the drawn parameters."""

    image: Image.Image
    quad: tuple[tuple[float, float], ...]  # source corners (tl, tr, br, bl) of the view's corners
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
            that at least `spec.min_roi_overlap` of its area lies inside it.
    """
    if max_side < 8:
        raise ValueError(f"max_side: must be >= 8, got {max_side}")
    rng = np.random.default_rng(seed)
    src = image.convert("RGB")
    W, H = src.size
    crop = _sample_crop(rng, W, H, spec, roi)
    yaw, pitch = (float(v) for v in rng.uniform(-spec.tilt, spec.tilt, size=2))
    roll = float(rng.uniform(-spec.rotation, spec.rotation))
    quad = fit_inside(tilt_quad(crop, yaw, pitch, roll), W, H)
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
    view, occluders = _occlude(rng, view, spec)
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
        "tilt": [round(yaw, 3), round(pitch, 3)],
        "roll": round(roll, 3),
        "quad": [[round(float(x), 3), round(float(y), 3)] for x, y in quad],
        "size": [out_w, out_h],
        "occluders": occluders,
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


def tilt_quad(crop: Box, yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Corners (tl, tr, br, bl) of `crop` turned about its centre and seen by a pinhole camera.

    The crop plane is rotated by yaw (about the vertical axis), pitch (horizontal axis) and roll
    (optical axis), in degrees, then projected with focal `FOCAL` x the crop's longer side at that
    distance: x' = f X / (f + Z). Zero angles return the crop's corners.
    """
    x1, y1, x2, y2 = crop
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    f = FOCAL * max(x2 - x1, y2 - y1)
    corners = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64) - centre
    a, b, c = np.deg2rad([yaw, pitch, roll])
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    pts = np.c_[corners, np.zeros(4)] @ (ry @ rx @ rz).T
    return centre + f * pts[:, :2] / (f + pts[:, 2:3])


def fit_inside(quad: np.ndarray, W: float, H: float) -> np.ndarray:
    """Shrink `quad` about its centroid by the largest s <= 1 that fits it in [0, W] x [0, H]."""
    centre = quad.mean(0)
    s = 1.0
    for px, py in quad - centre:
        for d, lo, hi, c in ((px, 0.0, W, centre[0]), (py, 0.0, H, centre[1])):
            if d > 0:
                s = min(s, (hi - c) / d)
            elif d < 0:
                s = min(s, (lo - c) / d)
    return centre + max(s, 0.0) * (quad - centre)


def lighting(
    img: np.ndarray, gamma: float, temperature: float, shade: float, angle: float
) -> np.ndarray:
    """Float RGB in [0, 1] under another light: v**gamma, red/blue gains 1 +- t, a linear ramp.

    The ramp multiplies the image by 1 - shade at the side the direction `angle` (radians) points
    away from, rising linearly to 1 at the opposite side.
    """
    h, w = img.shape[:2]
    out = np.clip(img, 0.0, 1.0) ** gamma
    out = out * np.array([1.0 + temperature, 1.0, 1.0 - temperature])
    if shade:
        y, x = np.mgrid[0:h, 0:w]
        proj = (x - (w - 1) / 2) * np.cos(angle) + (y - (h - 1) / 2) * np.sin(angle)
        span = np.ptp(proj) or 1.0
        ramp = 1.0 - shade * (proj.max() - proj) / span
        out = out * ramp[..., None]
    return np.clip(out, 0.0, 1.0)


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


def _occlude(
    rng: np.random.Generator, img: Image.Image, spec: ViewSpec
) -> tuple[Image.Image, list[dict]]:
    """Paste up to `MAX_OCCLUDERS` blurred, darkened, displaced copies of the view as blobs.

    Always draws the same number of values, so the rest of the view does not depend on `spec`'s
    occlusion settings; returns the image and the occluders' boxes (view pixels) and shapes.
    """
    w, h = img.size
    on = bool(rng.random() < spec.occlusion_p)
    total = float(rng.uniform(*spec.occlusion_area))
    count = int(rng.integers(1, MAX_OCCLUDERS + 1))
    draws = rng.uniform(size=(MAX_OCCLUDERS, 4))  # shape, aspect, centre x, centre y
    dark, shift = (float(v) for v in rng.uniform(size=2))
    if not on:
        return img, []
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    records = []
    for shape_u, aspect_u, cx_u, cy_u in draws[:count]:
        area = total / count * w * h
        aspect = float(np.exp((aspect_u * 2 - 1) * np.log(4.0)))  # width/height in [1/4, 4]
        bw, bh = min(w, np.sqrt(area * aspect)), min(h, np.sqrt(area / aspect))
        cx, cy = cx_u * w, cy_u * h
        box = [round(float(v), 1) for v in (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)]
        shape = "ellipse" if shape_u < 0.5 else "bar"
        (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=255)
        records.append({"box": box, "shape": shape})
    radius = max(1.0, 0.03 * max(w, h))
    arr = np.roll(np.asarray(img), (int(shift * h), int((1 - shift) * w)), axis=(0, 1))
    fill = Image.fromarray(arr).filter(ImageFilter.GaussianBlur(radius))
    fill = ImageEnhance.Brightness(fill).enhance(0.3 + 0.5 * dark)
    return Image.composite(fill, img, mask.filter(ImageFilter.GaussianBlur(1.0))), records


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
    """Lighting, colour jitter in a fixed order, then optional greyscale and blur; drawn values."""
    gamma = float(np.exp(rng.uniform(-1, 1) * np.log(spec.gamma)))
    temp = float(rng.uniform(-spec.temperature, spec.temperature))
    shade = float(rng.uniform(0, spec.shade))
    angle = float(rng.uniform(0, 2 * np.pi))
    b = float(rng.uniform(1 - spec.brightness, 1 + spec.brightness))
    c = float(rng.uniform(1 - spec.contrast, 1 + spec.contrast))
    s = float(rng.uniform(1 - spec.saturation, 1 + spec.saturation))
    hue = float(rng.uniform(-spec.hue, spec.hue))
    gray = bool(rng.random() < spec.grayscale_p)
    blur = float(rng.uniform(*spec.blur_sigma)) if rng.random() < spec.blur_p else 0.0
    if gamma != 1.0 or temp or shade:
        lit = lighting(np.asarray(img, dtype=np.float64) / 255.0, gamma, temp, shade, angle)
        img = Image.fromarray(np.round(lit * 255.0).astype(np.uint8))
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
        "gamma": round(gamma, 4),
        "temperature": round(temp, 4),
        "shade": round(shade, 4),
        "shade_angle": round(angle, 4),
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
