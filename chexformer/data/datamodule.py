"""The LightningDataModule of a training run: scan, split, datasets and loaders.

In: ``cfg.data_dir`` (``train/``, optional ``val/`` and ``test/``, see
:data:`~chexformer.data.scan.LAYOUT`), scanned and split by patient with
:mod:`chexformer.data.scan`. Out: training and validation DataLoaders of
:class:`~chexformer.data.datasets.XrayDataset` images, or of cached backbone maps
(:mod:`chexformer.data.cache`) on the fast frozen-backbone path, plus the data summary that
goes into checkpoints and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from chexformer import shifts
from chexformer.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from chexformer.config import Config
from chexformer.data.cache import CachedFeatureDataset, FeatureCache, cache_key
from chexformer.data.datasets import TwoViews, XrayDataset, build_transforms
from chexformer.data.scan import (
    DatasetLayoutError,
    PatientOverlapError,
    class_counts,
    describe,
    scan_folder,
    shared_patients,
    split_by_patient,
)
from chexformer.model import num_logits
from chexformer.runtime import autocast_dtype, default_device
from chexformer.synthetic import is_synthetic

log = logging.getLogger(__name__)

__all__ = ["XrayDataModule"]


class XrayDataModule(L.LightningDataModule):
    """``DATA/train`` (split by patient into train/val, or ``DATA/val`` as is) and ``DATA/test``."""

    def __init__(self, cfg: Config, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.cfg = cfg
        self.mean, self.std = tuple(mean), tuple(std)
        self.class_names: list[str] = []
        self.train_samples: list = []
        self.val_samples: list = []
        self.test_samples: list = []
        self.skipped: list[tuple[Path, str]] = []
        self.suspect: list[tuple[Path, str]] | None = []  # None: not checked (images not preloaded)
        self.ignored = 0
        self.val_source = "split"
        self.shared_patients: dict[str, list[str]] = {}
        self._scanned = False
        self._built = False
        self.train_set = self.val_set = None
        self.train_images = self.val_images = None  # image datasets, also when features are cached
        self.cached = False
        self.cache_request: dict[str, Any] | None = None
        self.cache_device: str | None = None
        self.sharpness: dict[str, Any] = {}

    # --- scanning and splitting ---------------------------------------------------------------
    def scan(self) -> None:
        """List every file once, skip unreadable ones, split by patient. Idempotent."""
        if self._scanned:
            return
        root = Path(self.cfg.data_dir)
        if not root.is_dir():
            raise DatasetLayoutError(
                f"data folder not found: {root}\n"
                "The public pediatric pneumonia data set (Kermany et al., 2018, CC BY 4.0: 'Labeled Optical "
                "Coherence Tomography (OCT) and Chest X-Ray Images for Classification', Mendeley Data, "
                "doi:10.17632/rscbjbr9sj.2, folder chest_xray/ with train/ and test/) has the layout below."
            )
        kw = dict(strict=self.cfg.strict, patient_regex=self.cfg.patient_regex)
        train = scan_folder(root / "train", **kw)
        self.class_names = train.class_names
        self.skipped += train.skipped
        self.ignored += train.ignored
        val = scan_folder(root / "val", self.class_names, **kw) if (root / "val").is_dir() else None
        counts = class_counts(val.samples, len(self.class_names)) if val is not None else []
        if val is not None and min(counts) >= self.cfg.min_val_per_class:
            self.skipped += val.skipped
            self.train_samples, self.val_samples = train.samples, val.samples
            self.val_source = "folder"
        else:
            if val is not None:
                log.warning(
                    "%s has too few images to choose a threshold, calibrate and early-stop on (%s; need >= %d per "
                    "class, min_val_per_class): it is NOT used; validating on a patient-grouped %.0f %% split of "
                    "train/ instead", root / "val", dict(zip(self.class_names, counts)), self.cfg.min_val_per_class,
                    100 * self.cfg.validation_split)
                self.val_source = f"split (val/ set aside: {sum(counts)} images)"
            self.train_samples, self.val_samples = split_by_patient(
                train.samples, self.cfg.validation_split, self.cfg.effective_split_seed
            )
        if (root / "test").is_dir():
            test = scan_folder(root / "test", self.class_names, **kw)
            self.skipped += test.skipped
            self.test_samples = test.samples
        self.shared_patients = shared_patients(
            {"train": self.train_samples, "val": self.val_samples, "test": self.test_samples}, self.cfg.patient_regex)
        if self.shared_patients:
            listing = "; ".join(f"{pair}: {', '.join(ids)}" for pair, ids in self.shared_patients.items())
            if not self.cfg.allow_patient_overlap:
                raise PatientOverlapError(
                    f"the same patients (or byte-identical files) appear in more than one split: {listing}. "
                    "Their images would leak between training and evaluation. Move them to one split, or pass "
                    "--allow-patient-overlap true if the ids only coincide.")
            log.warning("patients shared between splits (allowed by allow_patient_overlap): %s", listing)
        self._scanned = True
        log.info("data: %s", json.dumps(self.summary()["splits"]))

    def summary(self) -> dict[str, Any]:
        splits = {"train": self.train_samples, "val": self.val_samples}
        if self.test_samples:
            splits["test"] = self.test_samples
        return {
            "class_names": self.class_names,
            "val_source": self.val_source,
            "synthetic": is_synthetic(self.cfg.data_dir),
            "shared_patients": self.shared_patients,
            "splits": {k: describe(v, self.class_names) for k, v in splits.items()},
            "skipped": [[str(p), r] for p, r in self.skipped],
            "suspect_images": None if self.suspect is None else [[str(p), r] for p, r in self.suspect],
            "ignored_non_images": self.ignored,
            **({"sharpness": self.sharpness} if self.sharpness else {}),
        }

    def class_weights(self) -> torch.Tensor | None:
        """pos_weight (binary) or per-class weights from the training counts."""
        if self.cfg.class_weighting != "pos_weight":
            return None
        counts = torch.tensor(class_counts(self.train_samples, len(self.class_names)), dtype=torch.float)
        if num_logits(len(self.class_names)) == 1:  # pos_weight of the one logit
            return (counts[0] / counts[1]).reshape(1)
        return counts.sum() / (len(counts) * counts)

    # --- datasets -------------------------------------------------------------------------------
    def _preload(self, n: int) -> bool:
        if self.cfg.preload == "auto":
            return n * 3 * self.cfg.img_size**2 / 2**30 <= self.cfg.preload_max_gb
        return self.cfg.preload == "on"

    def transforms(self, train: bool):
        return build_transforms(self.cfg, train=train, mean=self.mean, std=self.std)

    def build_images(self) -> None:
        """The image datasets of train and val (decoded and preloaded once). Idempotent."""
        self.scan()
        if self._built:
            return
        cfg = self.cfg
        preload = self._preload(len(self.train_samples) + len(self.val_samples))
        self.train_images = XrayDataset(self.train_samples, cfg.img_size, cfg.keep_aspect,
                                             self.transforms(train=True), preload=preload)
        self.val_images = XrayDataset(self.val_samples, cfg.img_size, cfg.keep_aspect,
                                           self.transforms(train=False), preload=preload)
        self.train_set, self.val_set = self.train_images, self.val_images
        if cfg.consistency > 0:  # two independently augmented views of each image, half as many images a batch
            self.train_set = TwoViews(self.train_images)
        self._flag_suspect_images()
        self._measure_sharpness()
        self._built = True

    def _flag_suspect_images(self) -> None:
        """Preloaded training and validation images whose pixels fail the pixel check (blank,
        a handful of grey levels, a large uniform patch: :func:`chexformer.guard.pixel_problems`), logged and
        listed in the run summary (``suspect_images``; null when the images are not preloaded, so not checked);
        they stay in the data, as labelled by the user."""
        from chexformer.guard import pixel_problems  # the guard module needs sklearn: import on use

        if not (self.train_images.preloaded and self.val_images.preloaded):
            log.info("images not preloaded: not checked for blank frames (summary.json: suspect_images null)")
            self.suspect = None
            return
        for data in (self.train_images, self.val_images):
            for i, sample in enumerate(data.samples):
                if i in data.failed_indices:
                    continue
                reason = pixel_problems([data.uint8(i)])[0]
                if reason is not None:
                    self.suspect.append((sample.path, reason))
        if self.suspect:
            log.warning("%d image(s) fail the pixel check; they are kept, as labelled, but check them:\n%s",
                        len(self.suspect), "\n".join(f"  {p}: {r}" for p, r in self.suspect[:20])
                        + (f"\n  ... and {len(self.suspect) - 20} more (summary.json: data.suspect_images)"
                           if len(self.suspect) > 20 else ""))

    def _measure_sharpness(self, per_class: int = 256) -> None:
        """Each class's median sharpness on (a seeded sample of) the training images at model size,
        logged as a warning sign of an acquisition cue; with ``sharpness_match`` (and ``augment``),
        the blur that takes it away in training (:class:`chexformer.shifts.SharpnessMatch`)."""
        cfg, data = self.cfg, self.train_images
        labels = torch.tensor(data.labels)
        if len(labels) == 0 or len(labels.unique()) < 2:
            return
        gen = torch.Generator().manual_seed(cfg.seed)
        picked = torch.cat([idx[torch.randperm(len(idx), generator=gen)[:per_class]]
                            for idx in (torch.nonzero(labels == c).flatten() for c in labels.unique())])
        images = torch.stack([shifts.standardize_tensor(data.uint8(int(i))) for i in picked])
        matcher, medians = shifts.SharpnessMatch.fit(images, labels[picked], p=cfg.sharpness_match)
        names = self.class_names
        self.sharpness = {"img_size": cfg.img_size, "images": len(picked),
                          "median": {names[c]: round(m, 6) for c, m in medians.items()}}
        log.info("sharpness of the training images (variance of the Laplacian at %d px, median of up to %d a class): "
                 "%s", cfg.img_size, per_class, ", ".join(f"{k} {v:.2e}" for k, v in self.sharpness["median"].items()))
        if cfg.augment and cfg.sharpness_match > 0:
            data.label_transform = matcher
            sigmas = {names[c]: s for c, s in matcher.sigmas.items()}
            self.sharpness |= {"match_p": cfg.sharpness_match, "match_sigma": sigmas}
            log.info("sharpness_match %.2f: %s", cfg.sharpness_match, ", ".join(
                f"{k} blurred (sigma {s:.2f} px at 224)" for k, s in sigmas.items()) or "no class is sharper")

    def setup(self, stage: str | None = None) -> None:
        """Lightning's per-process hook: images, then (fast frozen path) the feature cache, built
        on this rank's own device once the process group exists."""
        self.build_images()
        if self.cache_request is not None and not self.cached:
            trainer = getattr(self, "trainer", None)
            device = trainer.strategy.root_device if trainer is not None else default_device(self.cfg.accelerator)
            self.enable_feature_cache(device=device, **self.cache_request)

    def enable_feature_cache(self, model, cache_dir: Path | None, precision: str, device) -> None:
        """Replace the image datasets by cached backbone maps (the backbone must be frozen)."""
        if not model.backbone_frozen:
            raise ValueError("the feature cache needs a fully frozen backbone (freeze_cnn=true, fine_tune_layers=0)")
        self.build_images()
        cfg = self.cfg
        views = cfg.cache_views if cfg.augment else 1
        desc = json.dumps({k: getattr(cfg, k) for k in (
            "img_size", "keep_aspect", "augment", "rotation_deg", "pad_fill", "translate", "scale_min", "scale_max",
            "brightness", "contrast", "acquisition_aug", "acquisition_strength", "sharpness_match", "intensity",
            "random_erasing", "edge_occlusion", "edge_occlusion_max", "region_blur", "region_blur_where", "seed")}
            | {"mean": self.mean, "std": self.std, "precision": precision}, sort_keys=True)
        kw = dict(batch_size=max(cfg.batch_size, 32), device=device, autocast_dtype=autocast_dtype(precision),
                  channels_last=cfg.channels_last)
        model.to(device)
        train_key = cache_key(self.train_samples, model.backbone, desc, views)
        val_key = cache_key(self.val_samples, model.backbone, desc + "-eval", 1)
        train_cache = FeatureCache.build(model, self.train_images, self.transforms(True), self.transforms(False),
                                         views, train_key, cache_dir, seed=cfg.seed, **kw)
        val_cache = FeatureCache.build(model, self.val_images, self.transforms(True), self.transforms(False),
                                       1, val_key, cache_dir, seed=cfg.seed, **kw)
        self.train_set = CachedFeatureDataset(train_cache, [s.label for s in self.train_samples], random_view=True)
        self.val_set = CachedFeatureDataset(val_cache, [s.label for s in self.val_samples], random_view=False)
        self.cached = True
        self.cache_device = str(device)
        log.info("fast frozen path: training the transformer on cached backbone maps (%d views per image, on %s)",
                 views, device)

    # --- loaders ------------------------------------------------------------------------------------
    def _loader(self, dataset, shuffle: bool, sampler=None) -> DataLoader:
        workers = 0 if self.cached else self.cfg.num_workers
        views = 2 if isinstance(dataset, TwoViews) else 1
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size // views,  # two views: the same number of images a step's forward sees
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.cfg.class_weighting == "sampler":
            counts = class_counts(self.train_samples, len(self.class_names))
            weights = [1.0 / counts[s.label] for s in self.train_samples]
            sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True)
        return self._loader(self.train_set, shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
