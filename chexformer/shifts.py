"""Acquisition shifts: what changes between scanners, periods and hospitals, as image operations.

One set of operations serves two purposes:

* **training augmentation** (:class:`RandomAcquisition`): random resolution loss, blur, noise,
  contrast curve (gamma) and JPEG compression, so the model cannot lean on how an image was
  acquired (in the Kermany training set NORMAL images are measurably sharper than PNEUMONIA ones);
* **the robustness suite** (:data:`SHIFT_SUITE`, used by ``chexformer evaluate --shift-suite``):
  each shift at three fixed severities, re-scored at the stored threshold, as the project's own
  proxy for "new hospital, new period".

Every operation takes and returns a uint8 image tensor ``(C, H, W)`` and keeps its size. After
any of them the model input passes through the intensity rule again
(:func:`standardize_tensor`), exactly as a file with those properties would.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import RandomAffine, RandomErasing
from torchvision.transforms.v2 import functional as TF

from chexformer.data.io import INTENSITY_PERCENTILES

__all__ = [
    "SHIFT_SUITE",
    "RandomAcquisition",
    "RandomAffinePad",
    "SharpnessMatch",
    "Shift",
    "apply_shift",
    "blur",
    "border",
    "crop",
    "downscale",
    "fill_masked",
    "gamma",
    "jpeg",
    "noise",
    "sharpness",
    "standardize_tensor",
]


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float().unsqueeze(0)  # (1, C, H, W)


def _uint8(x: torch.Tensor) -> torch.Tensor:
    return x.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)


def downscale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Resolution loss: shrink by ``factor`` (antialiased) and enlarge back (bilinear)."""
    if factor <= 1:
        return x
    h, w = x.shape[-2:]
    small = F.interpolate(_float(x), size=(max(1, round(h / factor)), max(1, round(w / factor))),
                          mode="bilinear", antialias=True, align_corners=False)
    return _uint8(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur; ``sigma`` in pixels of a 224 px image (scaled to the image's size)."""
    sigma = sigma * x.shape[-1] / 224
    if sigma <= 0.05:
        return x
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


def noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Additive Gaussian noise of ``std`` grey levels (of 255)."""
    if std <= 0:
        return x
    n = torch.randn(x.shape[-2:], generator=generator) * std  # same noise in every channel (grey)
    return _uint8(_float(x) + n)


def gamma(x: torch.Tensor, g: float) -> torch.Tensor:
    """Contrast curve ``out = in ** g`` on 0..1 (g > 1 darkens mid-tones, g < 1 brightens)."""
    return x if g == 1 else TF.adjust_gamma(x, g)


def jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    """JPEG compression at ``quality`` (1..100)."""
    return x if quality >= 100 else TF.jpeg(x, int(quality))


def crop(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Tighter field of view: cut ``fraction`` of the side from every edge, enlarge back."""
    h, w = x.shape[-2:]
    dy, dx = round(h * fraction), round(w * fraction)
    if dy == 0 and dx == 0:
        return x
    inner = _float(x)[..., dy:h - dy, dx:w - dx]
    return _uint8(F.interpolate(inner, size=(h, w), mode="bilinear", align_corners=False))


def border(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Wider field of view with a black collimation border: shrink the image by ``2 * fraction``
    of its side and pad it back with black."""
    h, w = x.shape[-2:]
    dy, dx = round(h * fraction), round(w * fraction)
    if dy == 0 and dx == 0:
        return x
    inner = F.interpolate(_float(x), size=(h - 2 * dy, w - 2 * dx), mode="bilinear", antialias=True,
                          align_corners=False)
    return _uint8(F.pad(inner, (dx, dx, dy, dy), value=0.0))


def standardize_tensor(x: torch.Tensor, percentiles: tuple[float, float] = INTENSITY_PERCENTILES) -> torch.Tensor:
    """The intensity rule on a uint8 tensor (C, H, W) of grey (R = G = B) pixels: the image's own
    percentiles -> 0..255 (see :func:`chexformer.data.standardize_intensity`)."""
    v = x[0].flatten().float()
    q = torch.quantile(v, torch.tensor([p / 100 for p in percentiles]))
    lo, hi = float(q[0]), float(q[1])
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return torch.zeros_like(x)
    return ((x.float() - lo) * (255.0 / (hi - lo))).round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# The robustness suite
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shift:
    """One acquisition shift with its three severities (mild, moderate, severe)."""

    name: str
    severities: tuple[float, float, float]
    op: Callable[..., torch.Tensor]
    unit: str


SHIFT_SUITE: tuple[Shift, ...] = (
    Shift("resolution", (1.5, 2.5, 4.0), downscale, "down- then up-scaling factor"),
    Shift("blur", (0.6, 1.2, 2.0), blur, "Gaussian sigma, px at 224"),
    Shift("noise", (3.0, 6.0, 12.0), noise, "Gaussian std, grey levels"),
    Shift("gamma_dark", (1.3, 1.6, 2.0), gamma, "gamma > 1"),
    Shift("gamma_bright", (0.8, 0.65, 0.5), gamma, "gamma < 1"),
    Shift("jpeg", (50, 25, 10), jpeg, "JPEG quality"),
    Shift("crop", (0.04, 0.08, 0.12), crop, "fraction cut per edge"),
    Shift("border", (0.04, 0.08, 0.12), border, "black border per edge"),
)
"""Each shift at three severities: 24 shifted copies of a labelled set (see ``--shift-suite``)."""


def apply_shift(x: torch.Tensor, shift: Shift, severity: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` under ``shift`` at ``severity``, then the intensity rule again."""
    out = shift.op(x, severity, generator) if shift.op is noise else shift.op(x, severity)
    return standardize_tensor(out)


class RandomAcquisition(torch.nn.Module):
    """Training augmentation: each acquisition change applied with probability ``p`` at a random
    strength up to ``strength`` times the suite's *moderate* severity, then the intensity rule.

    Resolution loss and blur are drawn together with the sharpness they remove in mind: the
    classes in the Kermany training set differ in sharpness, and a model should not use it.
    """

    def __init__(self, p: float = 0.5, strength: float = 1.0) -> None:
        super().__init__()
        self.p, self.strength = float(p), float(strength)

    def _coin(self) -> bool:
        return bool(torch.rand(()) < self.p)

    def _u(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.strength
        if self._coin():
            x = downscale(x, self._u(1.0, 1.0 + 1.5 * s))
        if self._coin():
            x = blur(x, self._u(0.0, 1.2 * s))
        if self._coin():
            x = gamma(x, math.exp(self._u(-1, 1) * math.log(1.6) * s))
        if self._coin():
            x = noise(x, self._u(0.0, 6.0 * s))
        if self._coin():
            x = jpeg(x, round(self._u(max(5, 100 - 75 * s), 95)))
        return standardize_tensor(x)

    def extra_repr(self) -> str:
        return f"p={self.p}, strength={self.strength}"


def fill_masked(x: torch.Tensor, mask: torch.Tensor, fill: str | int = "mean") -> torch.Tensor:
    """uint8 image(s) (..., C, H, W) with the pixels where ``mask`` is True (broadcast against ``x``)
    set to each image's mean grey level (``fill='mean'``: no new edge of black or white), to 0
    (``'black'``, the training affine's padding before ``pad_fill: random``) or to a grey level
    0-255 given as an int."""
    fill = 0 if fill == "black" else fill
    if fill == "mean":
        value = x.float().mean(dim=(-3, -2, -1), keepdim=True).round().to(x.dtype)
    elif isinstance(fill, int) and not isinstance(fill, bool) and 0 <= fill <= 255:
        value = torch.tensor(fill, dtype=x.dtype)
    else:
        raise ValueError(f"fill must be 'mean', 'black' or a grey level 0-255, got {fill!r}")
    return torch.where(mask, value.expand_as(x), x)


def hide_edges(x: torch.Tensor, fractions: tuple[float, float, float, float]) -> torch.Tensor:
    """uint8 image (C, H, W) with bands along its top, bottom, left and right edges, ``fractions`` of
    the height or width wide, set to the image's mean grey level (:func:`fill_masked`)."""
    _, h, w = x.shape
    top, bottom = round(fractions[0] * h), round(fractions[1] * h)
    left, right = round(fractions[2] * w), round(fractions[3] * w)
    band = torch.zeros(h, w, dtype=torch.bool)
    band[:top] = band[h - bottom:] = True
    band[:, :left] = band[:, w - right:] = True
    return fill_masked(x, band)


class RandomEdgeOcclusion(torch.nn.Module):
    """Training augmentation: with probability ``p``, hide a band along each edge, each edge's width
    drawn uniformly up to ``max_fraction`` of the side, with the image's mean grey level
    (:func:`hide_edges`), so laterality markers, collimation edges and what lies outside the lungs
    cannot decide the class (``bench/shortcut_probe.py`` measures how much a model reads there)."""

    def __init__(self, p: float = 0.5, max_fraction: float = 0.2) -> None:
        super().__init__()
        self.p, self.max_fraction = float(p), float(max_fraction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(torch.rand(()) < self.p):
            return x
        widths = (torch.rand(4) * self.max_fraction).tolist()
        return hide_edges(x, tuple(widths))

    def extra_repr(self) -> str:
        return f"p={self.p}, max_fraction={self.max_fraction}"


class RandomRegionBlur(torch.nn.Module):
    """Training augmentation: with probability ``p``, blur one random rectangle of the image (2-33 %
    of its area, aspect 0.3-3.3, drawn by torchvision's ``RandomErasing.get_params``) with a
    Gaussian of sigma drawn from ``sigma`` (pixels of a 224 px image, scaled to the image's size).

    In the Kermany training images a PNEUMONIA image holds less structure at the scale of 7-18 px
    (at 128 px) than a NORMAL one, outside the lungs too, and the recipe's model reads a region with
    that structure removed as pneumonia (``bench/patch_cue.py``); the acquisition augmentation blurs
    only up to sigma 1.2 px of 224 (0.7 px at 128). Blurring a region of either class at that scale
    makes the cue carry no label, while the region keeps its brightness (random erasing flattens it
    to the mean). Measured on the recipe (record "Region blur on the 10-epoch recipe", two seeds): the
    rectangle anywhere costs worst-case sensitivity and AUC under the shift suite; it is off by default.

    ``where="top_bottom_centre"`` blurs, instead, a band across the middle half of the image's width
    at its top or its bottom (either with probability 1/2, 8-25 % of the height deep): on a frontal chest
    film, mostly the neck and upper mediastinum or the upper abdomen rather than the lung fields, which the
    rectangle of ``"anywhere"`` often covers (there less structure is the disease). A fixed region, not a
    lung mask: where the training affine zooms out or shifts, a lung apex or base can reach into it.
    The Kermany recipe uses it (``configs/kermany.yaml``, record "The band adopted" and "A fourth seed with
    the band": the cue nearly gone on every probed pair; "The plain command on a fifth host kind" and "A
    second band seed on the fifth host kind": over six pairs the suite's worst-case specificity is 0.011 lower
    on average, and one AMD seed misses the proxy goal, so the adoption is to be re-weighed)."""

    WHERE = ("anywhere", "top_bottom_centre")

    def __init__(self, p: float = 0.5, sigma: tuple[float, float] = (8.0, 32.0), where: str = "anywhere") -> None:
        super().__init__()
        if where not in self.WHERE:
            raise ValueError(f"where must be one of {self.WHERE}, got {where!r}")
        self.p, self.sigma, self.where = float(p), (float(sigma[0]), float(sigma[1])), where

    def _box(self, x: torch.Tensor) -> tuple[int, int, int, int] | None:
        h, w = x.shape[-2:]
        if self.where == "top_bottom_centre":
            rh = max(1, round(h * float(torch.empty(()).uniform_(0.08, 0.25))))
            top = 0 if bool(torch.rand(()) < 0.5) else h - rh
            return top, w // 4, rh, w - 2 * (w // 4)
        top, left, rh, rw, _ = RandomErasing.get_params(x, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=[0])
        return None if (rh, rw) == (h, w) else (top, left, rh, rw)  # no rectangle in RandomErasing's ten tries

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(torch.rand(()) < self.p):
            return x
        box = self._box(x)
        if box is None:
            return x
        top, left, rh, rw = box
        sigma = float(torch.empty(()).uniform_(*self.sigma)) * x.shape[-1] / 224
        out = x.clone()
        out[..., top:top + rh, left:left + rw] = separable_blur(x, sigma)[..., top:top + rh, left:left + rw]
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}, sigma={self.sigma}, where={self.where!r}"


def separable_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a uint8 image (C, H, W) with ``sigma`` in pixels of this image, as
    torchvision's ``gaussian_blur`` with a row kernel, then a column kernel (reflected edges, as
    :func:`blur`): a wide sigma costs ``6 sigma`` taps a pixel, not its square."""
    k = 2 * math.ceil(3 * sigma) + 1
    y = TF.gaussian_blur(x.float(), kernel_size=[k, 1], sigma=[sigma, sigma])
    y = TF.gaussian_blur(y, kernel_size=[1, k], sigma=[sigma, sigma])
    return y.round().clamp(0, 255).to(x.dtype)


class RandomAffinePad(torch.nn.Module):
    """Training augmentation: a random rotation (up to ``degrees``), shift (up to ``translate`` of
    the side) and zoom (``scale``), bilinear, drawn by torchvision's ``RandomAffine.get_params``;
    what it uncovers (rotated corners, the frame of a zoomed-out image) is filled with ``fill``:
    ``"black"`` (exactly ``v2.RandomAffine(fill=0)``, the same random draws) or ``"random"``, one
    grey level drawn uniformly from 0-255 for each image, so a uniform area of any level, black
    included, carries no class."""

    def __init__(self, degrees: float, translate: float, scale: tuple[float, float], fill: str = "black") -> None:
        super().__init__()
        if fill not in ("black", "random"):
            raise ValueError(f"fill must be 'black' or 'random', got {fill!r}")
        self.degrees, self.translate, self.scale, self.fill = float(degrees), float(translate), tuple(scale), fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        angle, shift, zoom, shear = RandomAffine.get_params(
            [-self.degrees, self.degrees], [self.translate, self.translate], list(self.scale), None, [w, h])
        level = 0.0 if self.fill == "black" else float(torch.randint(0, 256, ()))  # black draws nothing more
        return TF.affine(x, angle=angle, translate=list(shift), scale=zoom, shear=list(shear),
                         interpolation=TF.InterpolationMode.BILINEAR, fill=[level] * x.shape[-3])

    def extra_repr(self) -> str:
        return f"degrees={self.degrees}, translate={self.translate}, scale={self.scale}, fill={self.fill!r}"


# ----------------------------------------------------------------------------------------------
# Sharpness as a class cue
# ----------------------------------------------------------------------------------------------
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Variance of the Laplacian of each uint8 image ``(N, C, H, W)`` (first channel, 0..1 scale):
    the usual focus measure; higher is sharper. Comparable between images of one size only."""
    x = images[:, :1].float().div(255)
    return F.conv2d(x, _LAPLACIAN.to(x.device)).flatten(1).var(dim=1)


def _blurred_sharpness(images: torch.Tensor, sigma: float) -> float:
    """Median sharpness of grey uint8 ``images`` (N, 1, H, W) after :func:`blur` and the intensity
    rule (:func:`standardize_tensor`, batched), as training sees them."""
    x = blur(images, sigma).flatten(1).float()
    q = torch.quantile(x, torch.tensor([p / 100 for p in INTENSITY_PERCENTILES]), dim=1)  # (2, N)
    lo, hi = q[0], q[1]
    flat = hi <= lo
    lo, hi = torch.where(flat, x.amin(1), lo), torch.where(flat, x.amax(1), hi)
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp_min(1e-6), torch.zeros_like(hi))
    out = ((x - lo[:, None]) * scale[:, None]).round_().clamp_(0, 255).to(torch.uint8)
    return float(sharpness(out.view_as(images)).median())


class SharpnessMatch:
    """Blur the images of the classes that are sharper than the bluntest one, so that sharpness
    stops telling the classes apart in training.

    In the Kermany training set NORMAL images are sharper than PNEUMONIA ones (their originals had
    higher resolution): a model trained from scratch learns "sharp means normal" and calls a
    normal image from a softer scanner pneumonia. :meth:`fit` measures each class's median
    :func:`sharpness` on (a sample of) the training images at model size and finds, by bisection,
    the Gaussian blur (sigma in pixels of a 224 px image, as :func:`blur`) that brings every sharper
    class's median down to the bluntest class's. In training each image of such a class is blurred
    by its class's sigma with probability ``p``, before the other augmentation.
    """

    def __init__(self, sigmas: dict[int, float], p: float = 1.0) -> None:
        self.sigmas, self.p = {int(k): float(v) for k, v in sigmas.items()}, float(p)

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, p: float = 1.0, max_sigma: float = 4.0,
            tol: float = 0.01) -> tuple[SharpnessMatch, dict[int, float]]:
        """From uint8 images ``(N, C, H, W)`` and their labels: the matcher and each class's median sharpness."""
        medians = {int(c): float(sharpness(images[labels == c]).median()) for c in labels.unique()}
        target = min(medians.values())
        sigmas = {}
        for c, m in medians.items():
            if m <= target * (1 + tol):
                continue
            mine = images[labels == c][:, :1].contiguous()
            lo, hi = 0.0, max_sigma
            if _blurred_sharpness(mine, hi) > target:  # even the widest blur leaves them sharper
                sigmas[c] = hi
                continue
            while hi - lo > 0.02:
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _blurred_sharpness(mine, mid) > target else (lo, mid)
            sigmas[c] = round(hi, 3)
        return cls(sigmas, p), medians

    def __call__(self, x: torch.Tensor, label: int) -> torch.Tensor:
        sigma = self.sigmas.get(int(label), 0.0)
        if sigma <= 0 or not bool(torch.rand(()) < self.p):
            return x
        return blur(x, sigma)

    def __repr__(self) -> str:
        return f"SharpnessMatch(sigmas={self.sigmas}, p={self.p})"
