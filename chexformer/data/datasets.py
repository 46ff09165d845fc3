"""Turn samples into model-input tensors: resize, augmentation transforms and the Dataset.

In: :class:`~chexformer.data.scan.Sample` lists from the folder scan; every image is decoded by
:func:`~chexformer.data.io.load_image` (the intensity rule). Out: ``(float tensor (3, S, S),
label, index)`` items for the DataModule's loaders, evaluation and the feature cache.

:class:`XrayDataset` decodes and resizes once (optionally preloading everything into one uint8
tensor) and survives files that vanish after the scan. Augmentation (:func:`build_transforms`)
runs on the resized uint8 tensor and never flips: the heart lies on the patient's left, and a
mirrored chest is anatomically impossible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from chexformer import shifts  # the module, not its names: shifts imports chexformer.data.io
from chexformer.data.io import ImageReadError, load_image
from chexformer.data.scan import Sample

log = logging.getLogger(__name__)

__all__ = ["TwoViews", "XrayDataset", "build_transforms", "resize_image"]


def resize_image(img: Image.Image, img_size: int, keep_aspect: bool = False) -> torch.Tensor:
    """RGB uint8 tensor (3, img_size, img_size): stretched (as in the Kermany preprocessing), or
    with ``keep_aspect`` scaled to fit and padded with black, centred. Bilinear with antialiasing
    (Pillow widens the filter when shrinking), like torchvision's ``Resize(antialias=True)``."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    size = (img_size, img_size)
    if keep_aspect:
        w, h = img.size
        scale = img_size / max(w, h)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        fitted = img if new == img.size else img.resize(new, Image.Resampling.BILINEAR)
        img = Image.new("RGB", size)
        img.paste(fitted, ((img_size - new[0]) // 2, (img_size - new[1]) // 2))
    elif img.size != size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()  # (3, S, S) uint8


def build_transforms(cfg, train: bool, mean: Sequence[float] | float, std: Sequence[float] | float) -> Callable:
    """uint8 (3, S, S) tensor, already resized -> normalised float32 tensor, the model input.

    Training (with ``cfg.augment``): a small random affine (rotation, translation, scale; what it
    uncovers filled as ``cfg.pad_fill`` says),
    brightness/contrast jitter and, with ``acquisition_aug > 0``, random acquisition changes
    (:class:`chexformer.shifts.RandomAcquisition`: resolution loss, blur, gamma, noise, JPEG), with
    ``edge_occlusion > 0`` bands along the edges hidden (:class:`chexformer.shifts.RandomEdgeOcclusion`),
    with ``region_blur > 0`` one rectangle blurred at a coarse scale (:class:`chexformer.shifts.RandomRegionBlur`) and,
    with ``random_erasing > 0``, one erased rectangle at the very end (on the normalised image).
    Never flips (the heart is on the patient's left) and never crops. Every path, training and
    evaluation, ends with the intensity rule on the model-size image
    (:func:`chexformer.shifts.standardize_tensor`), then ``intensity: equalize`` if set.
    """
    mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(m) for m in mean]
    std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(s) for s in std]
    steps: list = []
    if train and cfg.augment:
        steps += [
            shifts.RandomAffinePad(cfg.rotation_deg, cfg.translate, (cfg.scale_min, cfg.scale_max),
                                   fill=getattr(cfg, "pad_fill", "black")),
            v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast),
        ]
        if getattr(cfg, "acquisition_aug", 0) > 0:
            steps.append(shifts.RandomAcquisition(cfg.acquisition_aug, cfg.acquisition_strength))
        if getattr(cfg, "edge_occlusion", 0) > 0:
            steps.append(shifts.RandomEdgeOcclusion(cfg.edge_occlusion, cfg.edge_occlusion_max))
        if getattr(cfg, "region_blur", 0) > 0:
            steps.append(shifts.RandomRegionBlur(cfg.region_blur, where=getattr(cfg, "region_blur_where", "anywhere")))
    steps.append(v2.Lambda(shifts.standardize_tensor))
    if getattr(cfg, "intensity", "stretch") == "equalize":
        steps.append(v2.RandomEqualize(p=1.0))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train and cfg.augment and cfg.random_erasing > 0:
        steps.append(v2.RandomErasing(p=cfg.random_erasing, value=0))  # 0 = each channel's Normalize mean
    return v2.Compose(steps)


class XrayDataset(Dataset):
    """Images of ``samples`` as ``(float tensor (3, S, S), label, index)``.

    Each image is decoded with :func:`load_image` and resized with :func:`resize_image`; then
    ``transform`` (see :func:`build_transforms`) turns the uint8 tensor into the model input, or,
    without a transform, it is scaled to float 0..1.

    ``label_transform(uint8 image, label)``, if given, runs before ``transform`` (training only:
    :class:`chexformer.shifts.SharpnessMatch`).

    ``preload=True`` decodes everything once, in ``num_preload_workers`` threads, into one uint8
    tensor (N, 1, S, S) for grayscale images (R = G = B, as X-rays are: a third of the memory of
    RGB) plus a dict for the rare colour ones, so epochs never decode a file again.

    A file that cannot be read any more (deleted or damaged after the scan) does not stop the
    epoch: a warning is logged, ``(path, reason)`` is appended to :attr:`failed` (once per file),
    and the image of the next sample of the same class that can be read is used instead (in index
    order, wrapping around; black if none can). The returned label and index stay those of the
    asked-for sample, so evaluation code can drop the indices in :attr:`failed_indices`. Failures
    that happen inside DataLoader worker processes are logged there but do not reach this object;
    preload, which runs in the calling process, records them all.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        img_size: int,
        keep_aspect: bool = False,
        transform: Callable | None = None,
        preload: bool = False,
        num_preload_workers: int = 2,
        label_transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.label_transform = label_transform
        self.img_size = img_size
        self.keep_aspect = keep_aspect
        self.transform = transform
        self.failed: list[tuple[Path, str]] = []
        self.failed_indices: set[int] = set()
        self._grey: torch.Tensor | None = None
        self._colour: dict[int, torch.Tensor] = {}
        if preload:
            self._preload(num_preload_workers)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    @property
    def preloaded(self) -> bool:
        return self._grey is not None

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, i: int) -> torch.Tensor:
        img = load_image(self.samples[i].path, size_hint=self.img_size)
        return resize_image(img, self.img_size, self.keep_aspect)

    def _try_decode(self, i: int) -> torch.Tensor | ImageReadError:
        try:
            return self._decode(i)
        except ImageReadError as exc:
            return exc

    def _record_failure(self, i: int, exc: ImageReadError) -> None:
        if i not in self.failed_indices:
            self.failed_indices.add(i)
            self.failed.append((self.samples[i].path, exc.reason))
            log.warning("cannot read %s (%s); using the next readable image of the same class instead",
                        self.samples[i].path, exc.reason)

    def _preload(self, workers: int) -> None:
        start = time.perf_counter()
        n, s = len(self.samples), self.img_size
        self._grey = torch.zeros((n, 1, s, s), dtype=torch.uint8)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, result in enumerate(pool.map(self._try_decode, range(n))):
                if isinstance(result, ImageReadError):
                    self._record_failure(i, result)
                elif torch.equal(result[0], result[1]) and torch.equal(result[0], result[2]):
                    self._grey[i, 0] = result[0]
                else:
                    self._colour[i] = result
        log.info("preloaded %d images at %d px (%.0f MB, %d colour) in %.1f s", n, s,
                 (self._grey.numel() + sum(t.numel() for t in self._colour.values())) / 2**20,
                 len(self._colour), time.perf_counter() - start)

    def _fetch(self, i: int) -> torch.Tensor | None:
        """The uint8 image of sample ``i`` itself, or None when it cannot be read."""
        if i in self.failed_indices:
            return None
        if self._grey is not None:
            if i in self._colour:
                return self._colour[i].clone()
            return self._grey[i].expand(3, -1, -1).contiguous()  # a copy: the store stays intact
        result = self._try_decode(i)
        if isinstance(result, ImageReadError):
            self._record_failure(i, result)
            return None
        return result

    def uint8(self, i: int) -> torch.Tensor:
        """The resized uint8 image (3, S, S) of sample ``i`` (its replacement if unreadable)."""
        img = self._fetch(i)
        if img is not None:
            return img
        n, label = len(self.samples), self.samples[i].label
        for step in range(1, n):
            j = (i + step) % n
            if self.samples[j].label == label:
                img = self._fetch(j)
                if img is not None:
                    return img
        return torch.zeros((3, self.img_size, self.img_size), dtype=torch.uint8)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        img = self.uint8(i)
        if self.label_transform is not None:
            img = self.label_transform(img, self.samples[i].label)
        x = self.transform(img) if self.transform is not None else img.float().div_(255)
        return x, self.samples[i].label, i


class TwoViews(Dataset):
    """``dataset``'s samples as ``(views (2, ...), label, index)``: each view is a separate
    ``dataset[i]``, so a training dataset's augmentation is drawn for each view independently
    (``consistency``: the training step compares the model's predictions on the two)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        (a, label, index), (b, _, _) = self.dataset[i], self.dataset[i]
        return torch.stack((a, b)), label, index
