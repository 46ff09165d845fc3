"""Synthetic chest radiographs for tests, demos and smoke runs without real data.

Each image is drawn from a seeded :class:`numpy.random.Generator`: a dark background, the soft
tissue of the thorax and shoulders, two dark lung fields closed below by the diaphragm domes, the
mediastinum and spine, the heart bulging towards the patient's left (the image's right, as on a
real PA film), ribs and clavicles as curved bright bands, lung markings, noise and blur. Anatomy
size, position, exposure and noise vary from image to image. PNEUMONIA images carry one to three
soft opacities with irregular borders inside a lung field, some faint; NORMAL images sometimes
carry distractors (a prominent hilum, a larger heart). A small CNN separates the classes in a few
epochs, but not from a single pixel statistic.

File names follow the Kermany pattern (``IM-XXXX-000N.png``, ``personNNN_bacteria_MMM.png``) and
about a quarter of the patients have two images (the same anatomy, a new exposure), so
patient-grouped splitting is exercised as on the real data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["make_synthetic_dataset", "synthetic_image", "is_synthetic", "CLASS_NAMES", "SYNTHETIC_MARKER"]

CLASS_NAMES = ("NORMAL", "PNEUMONIA")
SYNTHETIC_MARKER = "SYNTHETIC.txt"
"""Written at the root of every generated data set; reports and model cards look for it."""


def is_synthetic(folder: str | os.PathLike) -> bool:
    """True for a data set written by :func:`make_synthetic_dataset` (its root or a split folder)."""
    folder = Path(folder)
    return (folder / SYNTHETIC_MARKER).is_file() or (folder.parent / SYNTHETIC_MARKER).is_file()


@dataclass
class _Anatomy:
    """One patient's chest, in image fractions (y down, x right); the patient's left is image right."""

    cx: float  # midline
    top: float  # lung apices
    height: float  # apex to diaphragm
    width: float  # midline to the lateral lung border at its widest
    scale_x: float
    mediastinum: float  # half-width of the upper mediastinum
    heart_w: float
    heart_h: float
    heart_dx: float  # heart centre right of the midline (patient's left)
    dome: float  # height of the diaphragm domes
    right_dome_lift: float  # the right hemidiaphragm (image left) sits higher, over the liver
    rib_phase: float
    tissue: float  # soft-tissue brightness
    lung_level: float  # aerated-lung brightness
    bone: float


def _random_anatomy(rng: np.random.Generator) -> _Anatomy:
    u = rng.uniform
    return _Anatomy(
        cx=u(0.47, 0.53), top=u(0.1, 0.17), height=u(0.55, 0.65), width=u(0.3, 0.37), scale_x=u(0.95, 1.05),
        mediastinum=u(0.045, 0.06), heart_w=u(0.15, 0.19), heart_h=u(0.11, 0.15), heart_dx=u(0.05, 0.08),
        dome=u(0.05, 0.08), right_dome_lift=u(0.01, 0.035), rib_phase=u(0.0, 1.0),
        tissue=u(0.5, 0.6), lung_level=u(0.14, 0.24), bone=u(0.12, 0.2),
    )


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean random field of roughly unit amplitude varying over about ``size / cells`` pixels."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small, "F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _render(
    a: _Anatomy, rng: np.random.Generator, size: int, opacity: bool, opacity_center: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    x = (xx - a.cx) / a.scale_x  # signed distance from the midline; > 0 is the patient's left
    ax = np.abs(x)
    y = yy + rng.uniform(-0.015, 0.015) * x  # slight rotation of the patient
    e = 0.006 + 1.0 / size  # border softness
    t = (y - a.top) / a.height  # 0 at the apices, 1 at the domes

    # Body: chest wall a little outside the lungs, shoulders above, neck on top.
    wall = a.width + 0.06 + 0.03 * np.clip(t, 0, 1)
    shoulder_line = t + 0.1 - 2.0 * np.clip(ax - 0.12, 0, None) ** 2
    thorax = _sigmoid((wall - ax) / 0.012) * _sigmoid(shoulder_line / 0.03)
    shoulders = _sigmoid((a.width + 0.12 - ax) / 0.02) * _sigmoid(shoulder_line / 0.02) * _sigmoid((0.25 - t) / 0.05)
    neck = _sigmoid((0.11 - ax) / 0.02)
    body = np.maximum(np.maximum(thorax, shoulders), neck)
    # Tangential soft tissue is brighter at the chest wall.
    img = 0.05 + body * (a.tissue - 0.1 + 0.1 * np.clip(ax / wall, 0, 1) ** 4)

    # Lung fields: medial border along the mediastinum, lateral border widening from the rounded
    # apex, closed below by the diaphragm domes (deep costophrenic angles laterally).
    lungs = np.zeros_like(x)
    for side in (-1.0, 1.0):
        on_side = _sigmoid(side * x / e)
        medial = a.mediastinum + 0.02 * np.exp(-(((t - 0.35) / 0.15) ** 2))  # hilum
        lateral = medial + (a.width - medial) * np.clip(1.15 * t, 0, 1) ** 0.4
        centre = 0.5 * (medial + a.width)
        half = 0.5 * (a.width - medial)
        dome_top = a.top + a.height - a.dome - (a.right_dome_lift if side < 0 else 0.0)
        diaphragm = dome_top + a.dome * np.clip((ax - centre) / half, -1.3, 1.3) ** 2
        lung = (on_side * _sigmoid((ax - medial) / e) * _sigmoid((lateral - ax) / e)
                * _sigmoid((diaphragm - y) / e) * _sigmoid(t / 0.02))
        lungs = np.maximum(lungs, lung)

    # Heart, to the patient's left, resting on the left hemidiaphragm; upper mediastinum above it.
    hy = a.top + a.height - a.dome - 0.6 * a.heart_h
    hw = np.where(x < a.heart_dx, 0.6 * a.heart_w, a.heart_w)  # the left ventricle bulges further out
    r = ((x - a.heart_dx) / hw) ** 2 + ((y - hy) / a.heart_h) ** 2
    heart = _sigmoid((1.0 - r) / 0.06) * _sigmoid((hy - 0.05 - y + 0.3 * (x - a.heart_dx)) / 0.04 + 3.0)
    heart = np.maximum(heart, _sigmoid((1.0 - r) / 0.06) * _sigmoid((y - hy) / 0.02))
    upper = _sigmoid((a.mediastinum - ax) / e) * _sigmoid((hy - y) / 0.02)
    dense = np.maximum(heart, upper)
    air = lungs * (1.0 - dense)
    # Lungs are darkest in the middle zones, lighter at the bases (more tissue in the beam).
    depth = a.lung_level + 0.08 * np.clip(t - 0.55, 0, None) + 0.05 * np.clip(0.15 - t, 0, None) / 0.15
    img = img * (1.0 - air) + air * depth

    # Trachea: an air column in the upper mediastinum.
    trachea = _sigmoid((0.016 - np.abs(x + 0.004)) / 0.005) * _sigmoid((a.top + 0.28 * a.height - y) / 0.02)
    img = img - 0.12 * trachea * body

    # Vessels fanning out from the hila, fading towards the periphery.
    markings = np.zeros_like(x)
    for side in (-1.0, 1.0):
        hx, hyl = side * (a.mediastinum + 0.04), a.top + 0.42 * a.height
        dist = np.hypot(x - hx, y - hyl)
        angle = np.arctan2(y - hyl, side * (x - hx))
        rays = np.cos(angle * rng.uniform(9, 13) + rng.uniform(0, 2 * np.pi) + 2.0 * _smooth_noise(rng, size, 10))
        markings += (np.clip(rays, 0, 1) ** 6) * np.exp(-dist / 0.12)
    img = img + air * (0.07 * markings + 0.015 * _smooth_noise(rng, size, 32))

    # Spine: vertebral bodies behind the mediastinum.
    spacing = a.height / 10
    vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * (y - a.top) / spacing)
    spine = _sigmoid((0.03 - np.abs(x)) / 0.006) * (0.5 + 0.5 * vertebrae)
    img = img + 0.4 * a.bone * spine * body

    # Ribs: posterior ribs run laterally and bend down at the chest wall; anterior ribs, fainter,
    # slope down towards the midline. Seen mostly where they cross aerated lung.
    inside = _sigmoid((wall - 0.01 - ax) / 0.01) * _sigmoid((ax - 0.035) / 0.008)
    ribs = np.zeros_like(x)
    gap = a.height / 9.5
    for i in range(-1, 11):
        y0 = a.top + (i + 0.3 * a.rib_phase) * gap
        posterior = y0 + 0.9 * np.clip(ax - 0.12, 0, None) ** 2 - 0.08 * np.clip(ax - 0.12, None, 0)
        ribs = np.maximum(ribs, np.exp(-(((y - posterior) / (0.17 * gap)) ** 2)))
        anterior = y0 + 0.08 + 0.55 * (a.width - ax) * 0.4
        ribs = np.maximum(ribs, 0.4 * np.exp(-(((y - anterior) / (0.15 * gap)) ** 2)) * _sigmoid((t - 0.05) / 0.05))
    ribs *= inside * _sigmoid((1.08 - t) / 0.03)
    # Clavicles: from the sternal notch out and up to the shoulders.
    clav_y = a.top + 0.035 - 0.16 * ax + 0.12 * ax**2
    clavicles = np.exp(-(((y - clav_y) / 0.012) ** 2)) * _sigmoid((a.width + 0.02 - ax) / 0.02)
    clavicles *= _sigmoid((ax - 0.035) / 0.008)
    img = img + a.bone * (ribs * (0.08 + 0.5 * air) + 0.8 * clavicles)

    # Pneumonia: patchy consolidations with irregular borders inside a lung field, some faint.
    mask = np.zeros((size, size), dtype=bool)
    if opacity:
        if opacity_center is not None:
            centres = [(float(opacity_center[0]), float(opacity_center[1]), rng.uniform(0.07, 0.1))]
        else:
            candidates = np.argwhere(air > 0.9)
            count = int(rng.choice([1, 1, 2, 3]))
            centres = []
            for _ in range(count if len(candidates) else 0):
                py, px = candidates[rng.integers(len(candidates))] / size
                centres.append((float(py), float(px), rng.uniform(0.07, 0.13)))
        total = np.zeros_like(x)
        for oy, ox, radius in centres:
            blob = np.zeros_like(x)
            for _ in range(int(rng.integers(4, 8))):  # a cluster of lobes gives an irregular border
                jy, jx = rng.normal(0.0, radius * 0.45, size=2)
                r2 = ((yy - oy - jy) ** 2 + (xx - ox - jx) ** 2) / (radius * rng.uniform(0.45, 0.85)) ** 2
                blob = np.maximum(blob, np.exp(-r2))
            blob *= np.clip(0.8 + 0.35 * _smooth_noise(rng, size, 28), 0.2, 1.2)  # mottled
            mask |= blob > 0.4
            total = np.maximum(total, blob * rng.uniform(0.16, 0.34))
        if opacity_center is None:
            total *= 0.25 + 0.75 * lungs
        img = img + total
    elif rng.random() < 0.3:  # distractor for NORMAL: prominent hila or a larger heart border
        hila = np.exp(-(((ax - a.mediastinum - 0.04) / 0.05) ** 2 + ((t - 0.42) / 0.1) ** 2))
        img = img + rng.uniform(0.04, 0.09) * hila * lungs

    # Exposure, uneven field, quantum noise, blur.
    img = np.clip(img, 0, None) ** rng.uniform(0.85, 1.2)
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.04, 0.04) + 0.03 * _smooth_noise(rng, size, 5)
    img = img + rng.normal(0.0, rng.uniform(0.01, 0.03), size=img.shape).astype(np.float32)
    out = Image.fromarray(np.clip(img * 255.0, 0, 255).astype(np.uint8), "L")
    out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 0.9) * size / 128))
    return np.asarray(out), mask


def synthetic_image(
    rng: np.random.Generator,
    img_size: int,
    opacity: bool,
    opacity_center: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic radiograph.

    Args:
        rng: the only source of randomness (same generator state -> same image).
        img_size: side in pixels.
        opacity: draw pneumonia-like opacities (1 to 3, inside the lung fields).
        opacity_center: ``(y, x)`` as fractions of the height and width: draw exactly one opacity
            centred there instead (it needs ``opacity=True``).

    Returns:
        ``(image, mask)``: uint8 (H, W) and bool (H, W), True where an opacity was drawn.
    """
    if opacity_center is not None and not opacity:
        raise ValueError("opacity_center needs opacity=True")
    return _render(_random_anatomy(rng), rng, img_size, opacity, opacity_center)


def make_synthetic_dataset(
    root: str | os.PathLike,
    n_per_class: int = 40,
    img_size: int = 128,
    seed: int = 0,
    splits: tuple[str, ...] = ("train", "test"),
    test_fraction: float = 0.25,
) -> Path:
    """Write ``root/<split>/{NORMAL,PNEUMONIA}/*.png`` and return ``root``.

    ``n_per_class`` images per class in all: every split other than ``train`` gets
    ``round(n_per_class * test_fraction)`` of them (at least one), ``train`` the rest. Patients
    never straddle splits. Same arguments -> byte-identical files.
    """
    root = Path(root)
    if n_per_class < 2:
        raise ValueError(f"n_per_class must be >= 2, got {n_per_class}")
    others = [s for s in splits if s != "train"]
    n_other = max(1, round(n_per_class * test_fraction)) if others else 0
    n_train = n_per_class - n_other * len(others) if "train" in splits else 0
    if "train" in splits and n_train < 2:
        raise ValueError(f"n_per_class={n_per_class} leaves {n_train} training images per class")
    rng = np.random.default_rng(seed)
    next_patient = {"NORMAL": 1000, "PNEUMONIA": 1}
    next_image = 1
    for split in splits:
        n = n_train if split == "train" else n_other
        for label, name in enumerate(CLASS_NAMES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            written = 0
            while written < n:
                patient = next_patient[name]
                next_patient[name] += 1
                anatomy = _random_anatomy(rng)
                views = 2 if (n - written >= 2 and rng.random() < 0.25) else 1
                for view in range(views):
                    pixels, _ = _render(anatomy, rng, img_size, bool(label), None)
                    if name == "NORMAL":
                        file = f"IM-{patient:04d}-{view + 1:04d}.png"
                    else:
                        file = f"person{patient}_bacteria_{next_image}.png"
                    next_image += 1
                    Image.fromarray(pixels, "L").save(folder / file)
                    written += 1
    (root / SYNTHETIC_MARKER).write_text(
        "Synthetic chest-radiograph-like images made by chexformer.synthetic.make_synthetic_dataset:\n"
        "a pipeline check, not medical data.\n")
    return root
