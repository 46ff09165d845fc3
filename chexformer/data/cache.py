"""Cache frozen-backbone feature maps: computed once, then reused every epoch.

In: the images of an :class:`~chexformer.data.datasets.XrayDataset` and a model whose backbone
is frozen. Out: :class:`CachedFeatureDataset` items (feature map, label, index) that the
DataModule serves instead of images on the fast frozen-backbone path, kept in memory and,
optionally, as ``features-<key>.pt`` in a cache folder.

With the DenseNet121 backbone fully frozen (BatchNorm in eval mode), its output for a given
input tensor never changes, so computing it every epoch is wasted work: it is ~99% of a
forward pass. The cache holds, for every training image, ``views`` feature maps (view 0 without
augmentation, the others with the training augmentation) and one un-augmented map for every
validation image. Training then samples one cached view per image per epoch and runs only the
transformer and head.

Entries are keyed by file content, the backbone's weights, the transform settings and the
number of views, so a changed file, checkpoint or setting never reuses stale features.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from chexformer.model import evaluating

log = logging.getLogger(__name__)

__all__ = ["FeatureCache", "CachedFeatureDataset", "cache_key", "compute_features"]

CACHE_DTYPE = torch.float16  # post-ReLU activations; halves memory, ~1e-3 relative error


def _file_digest(path: Path) -> str:
    return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()


def _hash_module(module: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(samples, backbone: nn.Module, transform_desc: str, views: int) -> str:
    """One key for a set of files (by content), backbone weights, transform settings and view count.

    Uses the content digests the data scan already computed (``Sample.digest``); only files the
    scan did not hash are read again."""
    h = hashlib.blake2b(digest_size=16)
    for s in samples:
        h.update((s.digest or _file_digest(s.path)).encode())
    for part in (_hash_module(backbone), transform_desc, str(views)):
        h.update(part.encode())
    return h.hexdigest()


@torch.no_grad()
def compute_features(
    model: nn.Module,
    images: list[torch.Tensor] | torch.Tensor,
    transform,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = True,
) -> torch.Tensor:
    """Backbone maps (N, 1024, h, w) for uint8 images (N, 3, S, S) after ``transform``."""
    device = torch.device(device)
    out = []
    with evaluating(model):
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(img) for img in images[start:start + batch_size]]).to(device)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                feats = model.forward_features(batch)
            out.append(feats.float().to(CACHE_DTYPE).cpu().contiguous())
    return torch.cat(out)


class FeatureCache:
    """Feature maps of one image set (``views`` per image), in memory and optionally on disk."""

    def __init__(self, features: torch.Tensor, views: int) -> None:
        self.features = features  # (N * views, 1024, h, w), image-major: image i view v at i * views + v
        self.views = views

    @property
    def num_images(self) -> int:
        return self.features.shape[0] // self.views

    def get(self, index: int, view: int = 0) -> torch.Tensor:
        return self.features[index * self.views + view].float()

    @classmethod
    def build(
        cls,
        model: nn.Module,
        dataset,
        train_transform,
        eval_transform,
        views: int,
        key: str,
        cache_dir: Path | None = None,
        seed: int = 0,
        **compute_kwargs,
    ) -> FeatureCache:
        """Compute (or read from ``cache_dir``) the maps of every image of ``dataset``.

        ``dataset.uint8(i)`` gives the resized uint8 image; view 0 uses ``eval_transform``, views
        1.. use ``train_transform`` with a generator seeded by ``seed`` (repeatable)."""
        path = Path(cache_dir) / f"features-{key}.pt" if cache_dir else None
        if path is not None and path.is_file():
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                if data["views"] == views and data["features"].shape[0] == len(dataset) * views:
                    log.info("feature cache: read %d maps from %s", data["features"].shape[0], path)
                    return cls(data["features"], views)
                log.warning("feature cache %s does not match this dataset; recomputing", path)
            except Exception as exc:  # a torn or foreign file is recomputed, never trusted
                log.warning("feature cache %s unreadable (%s); recomputing", path, exc)
        start = time.perf_counter()
        images = [dataset.uint8(i) for i in range(len(dataset))]
        per_view = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            label_transform = getattr(dataset, "label_transform", None)
            for v in range(views):
                view = images
                if v > 0 and label_transform is not None:  # training views, as __getitem__ gives them
                    view = [label_transform(img, s.label) for img, s in zip(images, dataset.samples)]
                per_view.append(compute_features(model, view, eval_transform if v == 0 else train_transform,
                                                 **compute_kwargs))
        features = torch.stack(per_view, dim=1).flatten(0, 1)  # (N * views, 1024, h, w)
        log.info("feature cache: computed %d maps (%d images x %d views) in %.1f s, %.0f MB",
                 features.shape[0], len(images), views, time.perf_counter() - start,
                 features.numel() * features.element_size() / 2**20)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # unique on any host: the ranks of a multi-node run may share the folder, and pids repeat
            tmp = path.parent / f"{path.name}.tmp-{uuid.uuid4().hex}"
            torch.save({"views": views, "features": features}, tmp)
            os.replace(tmp, path)  # atomic: a kill never leaves a torn cache file
        return cls(features, views)


class CachedFeatureDataset(Dataset):
    """(feature map, label, index) items; in training, a random cached view per item."""

    def __init__(self, cache: FeatureCache, labels: list[int], random_view: bool) -> None:
        if cache.num_images != len(labels):
            raise ValueError(f"cache holds {cache.num_images} images but {len(labels)} labels were given")
        self.cache = cache
        self.labels = labels
        self.random_view = random_view and cache.views > 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        view = int(torch.randint(self.cache.views, ()).item()) if self.random_view else 0
        return self.cache.get(index, view), self.labels[index], index
