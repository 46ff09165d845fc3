"""Training with Lightning: the LightningModule, the DataModule and ``train(cfg)``.

A run folder ``OUT/`` holds ``config.yaml`` (resolved), ``split.csv``, ``checkpoints/best.ckpt``
(lowest validation loss), ``checkpoints/last.ckpt`` (every epoch, for ``--resume``),
``checkpoints/final.ckpt`` (the weights training ended with), ``tensorboard/`` and
``history.csv``. Checkpoints are written atomically (temporary file, then rename), so a kill at
any moment leaves the previous complete file in place.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    WeightAveraging,
)
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, WeightedRandomSampler

from chexformer.cache import CachedFeatureDataset, FeatureCache, cache_key
from chexformer.checkpoint import IMAGENET_MEAN, IMAGENET_STD, CheckpointMeta
from chexformer.config import Config
from chexformer.model import build_model
from chexformer.runtime import autocast_dtype, default_device, resolve_accelerator, resolve_precision
from chexformer.weights import init_backbone

log = logging.getLogger(__name__)

__all__ = ["ChexFormerModule", "XrayDataModule", "train", "RunExistsError"]


class RunExistsError(FileExistsError):
    """The output folder already holds a run's checkpoints."""


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
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

    # --- scanning and splitting ---------------------------------------------------------------
    def scan(self) -> None:
        """List every file once, skip unreadable ones, split by patient. Idempotent."""
        if self._scanned:
            return
        from chexformer import data

        root = Path(self.cfg.data_dir)
        if not root.is_dir():
            raise data.DatasetLayoutError(
                f"data folder not found: {root}\n"
                "The public pediatric pneumonia data set (Kermany et al., 2018, CC BY 4.0: 'Labeled Optical "
                "Coherence Tomography (OCT) and Chest X-Ray Images for Classification', Mendeley Data, "
                "doi:10.17632/rscbjbr9sj.2, folder chest_xray/ with train/ and test/) has the layout below."
            )
        kw = dict(strict=self.cfg.strict, patient_regex=self.cfg.patient_regex)
        train = data.scan_folder(root / "train", **kw)
        self.class_names = train.class_names
        self.skipped += train.skipped
        self.ignored += train.ignored
        val = data.scan_folder(root / "val", self.class_names, **kw) if (root / "val").is_dir() else None
        counts = data.class_counts(val.samples, len(self.class_names)) if val is not None else []
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
            self.train_samples, self.val_samples = data.split_by_patient(
                train.samples, self.cfg.validation_split, self.cfg.seed
            )
        if (root / "test").is_dir():
            test = data.scan_folder(root / "test", self.class_names, **kw)
            self.skipped += test.skipped
            self.test_samples = test.samples
        self.shared_patients = data.shared_patients(
            {"train": self.train_samples, "val": self.val_samples, "test": self.test_samples}, self.cfg.patient_regex)
        if self.shared_patients:
            listing = "; ".join(f"{pair}: {', '.join(ids)}" for pair, ids in self.shared_patients.items())
            if not self.cfg.allow_patient_overlap:
                raise data.PatientOverlapError(
                    f"the same patients (or byte-identical files) appear in more than one split: {listing}. "
                    "Their images would leak between training and evaluation. Move them to one split, or pass "
                    "--allow-patient-overlap true if the ids only coincide.")
            log.warning("patients shared between splits (allowed by allow_patient_overlap): %s", listing)
        self._scanned = True
        log.info("data: %s", json.dumps(self.summary()["splits"]))

    def summary(self) -> dict[str, Any]:
        from chexformer import data

        splits = {"train": self.train_samples, "val": self.val_samples}
        if self.test_samples:
            splits["test"] = self.test_samples
        return {
            "class_names": self.class_names,
            "val_source": self.val_source,
            "shared_patients": self.shared_patients,
            "splits": {k: data.describe(v, self.class_names) for k, v in splits.items()},
            "skipped": [[str(p), r] for p, r in self.skipped],
            "ignored_non_images": self.ignored,
        }

    def class_weights(self) -> torch.Tensor | None:
        """pos_weight (binary) or per-class weights from the training counts."""
        from chexformer import data

        if self.cfg.class_weighting != "pos_weight":
            return None
        counts = torch.tensor(data.class_counts(self.train_samples, len(self.class_names)), dtype=torch.float)
        if len(self.class_names) == 2:
            return (counts[0] / counts[1]).reshape(1)
        return counts.sum() / (len(counts) * counts)

    # --- datasets -------------------------------------------------------------------------------
    def _preload(self, n: int) -> bool:
        if self.cfg.preload == "auto":
            return n * 3 * self.cfg.img_size**2 / 2**30 <= self.cfg.preload_max_gb
        return self.cfg.preload == "on"

    def transforms(self, train: bool):
        from chexformer import data

        return data.build_transforms(self.cfg, train=train, mean=self.mean, std=self.std)

    def build_images(self) -> None:
        """The image datasets of train and val (decoded and preloaded once). Idempotent."""
        self.scan()
        if self._built:
            return
        from chexformer import data

        cfg = self.cfg
        preload = self._preload(len(self.train_samples) + len(self.val_samples))
        self.train_images = data.XrayDataset(self.train_samples, cfg.img_size, cfg.keep_aspect,
                                             self.transforms(train=True), preload=preload)
        self.val_images = data.XrayDataset(self.val_samples, cfg.img_size, cfg.keep_aspect,
                                           self.transforms(train=False), preload=preload)
        self.train_set, self.val_set = self.train_images, self.val_images
        self._built = True

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
            "img_size", "keep_aspect", "augment", "rotation_deg", "translate", "scale_min", "scale_max",
            "brightness", "contrast", "acquisition_aug", "acquisition_strength", "intensity", "seed")}
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
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.cfg.class_weighting == "sampler":
            from chexformer import data

            counts = data.class_counts(self.train_samples, len(self.class_names))
            weights = [1.0 / counts[s.label] for s in self.train_samples]
            sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True)
        return self._loader(self.train_set, shuffle=True, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


# ----------------------------------------------------------------------------------------------
# The LightningModule
# ----------------------------------------------------------------------------------------------
class ChexFormerModule(L.LightningModule):
    """Wraps the plain model for training; knows the loss, optimiser, schedule and metadata."""

    def __init__(self, cfg: Config, class_names: list[str], model: torch.nn.Module | None = None,
                 class_weight: torch.Tensor | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.cfg = cfg
        self.class_names = list(class_names)
        self.binary = len(self.class_names) == 2
        self.model = model if model is not None else build_model(cfg, len(self.class_names))
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.mean, self.std = tuple(mean), tuple(std)
        self.use_features = False
        self.threshold = 0.5
        self.temperature = 1.0
        self.bias = 0.0
        self.val_auc = float("nan")
        self.explain_images: torch.Tensor | None = None
        self.data_summary: dict[str, Any] = {}
        self.validated_epoch = -1
        self.val_predictions: dict[str, list] = {}
        self._val_out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._train_out: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._log_grads = False
        self.epoch_train_metrics: dict[str, float] = {}

    # --- steps ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_features:
            return self.model.forward_from_features(x)
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.binary:
            target = y.float()
            if self.cfg.label_smoothing:
                target = target * (1 - self.cfg.label_smoothing) + 0.5 * self.cfg.label_smoothing
            return F.binary_cross_entropy_with_logits(logits.squeeze(1), target, pos_weight=self.class_weight)
        return F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=self.cfg.label_smoothing)

    def _accuracy(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred = (logits.squeeze(1) > 0).long() if self.binary else logits.argmax(1)
        return (pred == y).float().mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        logits = self._logits(x)
        loss = self._loss(logits, y)
        bs = y.shape[0]
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("train_acc", self._accuracy(logits, y), on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        self._train_out.append((logits.detach().float(), y.detach(), loss.detach().float() * bs))
        return loss

    def on_train_epoch_start(self) -> None:
        self._log_grads = True
        self._train_out = []

    def on_train_epoch_end(self) -> None:
        """This epoch's training loss, accuracy and AUC (as trained: augmented, dropout on), kept
        in :attr:`epoch_train_metrics` for the history; AUC is also logged."""
        if not self._train_out:
            return
        logits = torch.cat([o[0] for o in self._train_out]).cpu()
        y = torch.cat([o[1] for o in self._train_out]).cpu()
        loss = float(sum(o[2] for o in self._train_out)) / len(y)
        self._train_out = []
        self.epoch_train_metrics = {"train_loss": loss,
                                    "train_acc": float(self._accuracy(logits, y)),
                                    "train_auc": float("nan")}
        y = y.numpy()
        if len(np.unique(y)) < 2:
            return
        from sklearn.metrics import roc_auc_score

        if self.binary:
            auc = roc_auc_score(y, logits[:, 0].numpy())
        else:
            present = np.unique(y)
            prob = torch.softmax(logits, 1).numpy()[:, present]
            auc = roc_auc_score(y, prob / prob.sum(1, keepdims=True), multi_class="ovr", labels=present) \
                if len(present) > 2 else float("nan")
        self.epoch_train_metrics["train_auc"] = float(auc)
        self.log("train_auc", float(auc), sync_dist=False)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, idx = batch
        logits = self._logits(x).float()
        loss = self._loss(logits, y)
        bs = y.shape[0]
        self.log("val_loss", loss, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val_acc", self._accuracy(logits, y), on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        self._val_out.append((logits.detach(), y.detach(), idx.detach()))

    def on_validation_epoch_start(self) -> None:
        self._val_out = []

    def on_validation_epoch_end(self) -> None:
        if not self._val_out:
            return
        logits = torch.cat([o[0] for o in self._val_out])
        labels = torch.cat([o[1] for o in self._val_out])
        index = torch.cat([o[2] for o in self._val_out])
        self._val_out = []
        if self.trainer.world_size > 1:  # every rank sees every prediction once
            logits, labels, index = (self.all_gather(t).flatten(0, 1) for t in (logits, labels, index))
            order = np.unique(index.cpu().numpy(), return_index=True)[1]
            logits, labels = logits[order], labels[order]
        auc = self._fit_threshold(logits.cpu(), labels.cpu())
        if not self.trainer.sanity_checking:
            self.validated_epoch = int(self.current_epoch)
        self.log("val_auc", auc, prog_bar=True, sync_dist=False, rank_zero_only=False)
        self._log_images()

    def _fit_threshold(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Temperature and decision threshold from this epoch's validation predictions."""
        from sklearn.metrics import roc_auc_score

        from chexformer import metrics

        y = labels.numpy()
        if self.trainer.sanity_checking or len(np.unique(y)) < 2:
            return float("nan")
        lg = logits.numpy()
        self.val_predictions = {"logits": lg[:, 0].tolist() if self.binary else lg.tolist(), "labels": y.tolist()}
        if self.binary:
            self.temperature, self.bias = metrics.fit_platt(lg[:, 0], y)
            prob = metrics.apply_platt(lg[:, 0], self.temperature, self.bias)
            if self.cfg.threshold_method == "sensitivity":
                self.threshold = float(metrics.choose_threshold(y, prob, "sensitivity", self.cfg.target_sensitivity))
            else:  # Youden's J on clean validation, middle of its best range; shift_robust is set after training
                from chexformer.robustness import robust_threshold

                self.threshold = robust_threshold(y, {"clean": prob})
            self.val_auc = float(roc_auc_score(y, prob))
        else:
            self.temperature = float(metrics.fit_temperature(lg, y, multiclass=True))
            prob = metrics.apply_temperature(lg, self.temperature, multiclass=True)
            present = np.unique(y)
            self.val_auc = float(roc_auc_score(y, prob[:, present] / prob[:, present].sum(1, keepdims=True),
                                               multi_class="ovr", labels=present)) if len(present) > 2 else float("nan")
        return self.val_auc

    # --- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.cfg
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        head = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
        groups = [{"params": head, "lr": cfg.init_lr, "name": "head"}]
        min_lrs = [cfg.min_lr]
        if backbone:
            groups.append({"params": backbone, "lr": cfg.init_lr * cfg.backbone_lr_scale, "name": "backbone"})
            min_lrs.append(min(cfg.min_lr, cfg.init_lr * cfg.backbone_lr_scale))
        # fused AdamW: one kernel for all parameters (CPU and CUDA), several times faster than the loop
        optimizer = torch.optim.AdamW(groups, lr=cfg.init_lr, weight_decay=cfg.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=min_lrs
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss", "interval": "epoch"}}

    # --- logging extras ---------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        """Gradient histograms per model part, once an epoch."""
        if not self._log_grads or not isinstance(self.logger, TensorBoardLogger):
            return
        self._log_grads = False
        parts: dict[str, list[torch.Tensor]] = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                key = ".".join(name.split(".")[:2]) if name.startswith(("backbone.", "layers.")) else name.split(".")[0]
                parts.setdefault(key, []).append(p.grad.detach().flatten().float())
        for key, grads in parts.items():
            self.logger.experiment.add_histogram(f"gradients/{key}", torch.cat(grads).cpu(), self.current_epoch)

    def _log_images(self) -> None:
        every = self.cfg.log_images_every
        if (not every or self.current_epoch % every or self.explain_images is None
                or not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking):
            return
        from torchvision.utils import make_grid

        from chexformer.explain import top_feature_channels

        x = self.explain_images.to(self.device)
        tb = self.logger.experiment
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        images = (x * std + mean).clamp(0, 1)
        tb.add_image("inputs", make_grid(images, nrow=len(x)), self.current_epoch)
        feats = self.model.feature_maps(x).float()  # (B, 1024, h, w)
        top = top_feature_channels(feats, k=8)  # (B, 8): the most active channels per image
        maps = torch.stack([feats[i, top[i]] for i in range(len(x))])  # (B, 8, h, w)
        maps = _normalise(F.interpolate(maps, size=x.shape[-2:], mode="nearest"))
        tb.add_image("feature_maps", make_grid(maps.flatten(0, 1).unsqueeze(1), nrow=8), self.current_epoch)
        if hasattr(self.model, "attention_maps") and getattr(self.model, "layers", None):
            attn = self.model.attention_maps(x)[-1].float()  # (B, heads, 1+N, 1+N), last layer
            h = w = feats.shape[-1]
            cls = attn[:, :, 0, 1:].reshape(len(x), -1, h, w)  # class token -> spatial tokens
            cls = _normalise(F.interpolate(cls, size=x.shape[-2:], mode="bilinear", align_corners=False))
            tb.add_image("attention_last_layer", make_grid(cls.flatten(0, 1).unsqueeze(1), nrow=cls.shape[1]),
                         self.current_epoch)

    # --- checkpoints --------------------------------------------------------------------------------
    def meta(self) -> CheckpointMeta:
        return CheckpointMeta(
            config=self.cfg, class_names=self.class_names, mean=self.mean, std=self.std,
            threshold=self.threshold, temperature=self.temperature, bias=self.bias, epoch=self.validated_epoch,
            extra={"val_auc": None if np.isnan(self.val_auc) else self.val_auc, "data": self.data_summary,
                   "val_predictions": self.val_predictions},
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["chexformer"] = self.meta().to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("chexformer", {})
        self.threshold = float(meta.get("threshold", 0.5))
        self.temperature = float(meta.get("temperature", 1.0))
        self.bias = float(meta.get("bias", 0.0))
        self.validated_epoch = int(meta.get("epoch", -1))
        self.val_predictions = dict(meta.get("extra", {}).get("val_predictions", {}))


def _normalise(t: torch.Tensor) -> torch.Tensor:
    lo = t.amin(dim=(-2, -1), keepdim=True)
    hi = t.amax(dim=(-2, -1), keepdim=True)
    return (t - lo) / (hi - lo).clamp_min(1e-8)


class HistoryCSV(Checkpoint):
    """``history.csv``: one row of metrics per epoch, rewritten atomically after each epoch.

    The train columns are the module's own averages over this epoch's batches
    (:attr:`ChexFormerModule.epoch_train_metrics`), the val columns this epoch's validation.
    Subclassing :class:`Checkpoint` makes Lightning call this after the module's
    ``on_train_epoch_end`` (as for ModelCheckpoint), so every row belongs to one epoch.
    """

    FIELDS = ["epoch", "train_loss", "train_acc", "train_auc", "val_loss", "val_acc", "val_auc", "lr", "threshold",
              "seconds"]

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        train = getattr(pl_module, "epoch_train_metrics", {})
        row = {
            "epoch": trainer.current_epoch, "train_loss": train.get("train_loss"), "train_acc": train.get("train_acc"),
            "train_auc": train.get("train_auc"),
            "val_loss": m.get("val_loss"), "val_acc": m.get("val_acc"), "val_auc": m.get("val_auc"),
            "lr": trainer.optimizers[0].param_groups[0]["lr"], "threshold": pl_module.threshold,
            "seconds": round(time.perf_counter() - self._start, 2),
        }
        rows = [r for r in read_history(self.path) if int(r["epoch"]) < trainer.current_epoch] + [row]
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


class EMA(WeightAveraging):
    """Exponential moving average of every parameter and buffer, updated after each optimiser
    step; Lightning validates and checkpoints the averaged weights."""

    def __init__(self, decay: float) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def read_history(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------
def train(cfg: Config, *, resume: bool = False, evaluate: bool = True) -> dict[str, Any]:
    """Train on ``cfg.data_dir``, write the run folder ``cfg.out_dir``, evaluate on ``test/``.

    Returns the run summary (also written to ``OUT/summary.json``)."""
    start = time.perf_counter()
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if not resume and any((ckpt_dir / n).exists() for n in ("best.ckpt", "last.ckpt", "final.ckpt")):
        raise RunExistsError(
            f"{out} already holds a run's checkpoints. Pass --resume to continue it, or choose another --out-dir."
        )
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    dm = XrayDataModule(cfg)
    dm.scan()
    out.mkdir(parents=True, exist_ok=True)
    accelerator = resolve_accelerator(cfg.accelerator)
    precision = resolve_precision(cfg.precision, accelerator)
    is_rank_zero = rank_zero_only.rank == 0  # Lightning reads it from the launcher's environment
    if is_rank_zero:
        cfg.save(out / "config.yaml")
        from chexformer import data

        data.write_split_csv(out / "split.csv", dm.train_samples, dm.val_samples, dm.test_samples or None,
                             dm.class_names)

    model = build_model(cfg, num_classes=len(dm.class_names))
    weights_report = init_backbone(model, cfg)
    module = ChexFormerModule(cfg, dm.class_names, model, class_weight=dm.class_weights())
    module.data_summary = dm.summary()
    if cfg.channels_last:
        module.model.to(memory_format=torch.channels_last)

    use_cache = model.backbone_frozen and cfg.cache_features != "off"
    if use_cache:
        cache_dir = None
        if cfg.cache_features == "disk":
            cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "feature_cache"
        dm.cache_request = {"model": model, "cache_dir": cache_dir, "precision": precision}  # built in setup()
        module.use_features = True
    if cfg.compile:
        # nn.Module.compile compiles in place and keeps state-dict keys, so checkpoints stay portable.
        target = module.model if not module.use_features else None
        if target is not None:
            target.backbone.compile()
        for layer in getattr(module.model, "layers", []):
            layer.compile()
        log.info("torch.compile: backbone%s and encoder layers compiled (first steps are slow)",
                 " (skipped: cached features)" if module.use_features else "")
    dm.build_images()
    n_explain = min(4, len(dm.val_images))
    module.explain_images = torch.stack([dm.val_images[i][0] for i in range(n_explain)]) if n_explain else None

    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    # A separate callback for last.ckpt: Lightning's save_last only writes it in epochs that also
    # improved the monitored metric, and a resume must lose at most the epoch in progress.
    last_checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    callbacks = [
        checkpoint,
        last_checkpoint,
        EarlyStopping(monitor="val_loss", mode="min", patience=cfg.patience),
        LearningRateMonitor(logging_interval="epoch"),
        HistoryCSV(out / "history.csv"),
        RankAgreement(),
    ]
    if cfg.ema_decay > 0:
        callbacks.insert(0, EMA(cfg.ema_decay))
    logger = TensorBoardLogger(save_dir=str(out), name="tensorboard", version="", default_hp_metric=False)
    steps_per_epoch = max(1, -(-len(dm.train_set) // cfg.batch_size))
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        max_time={"minutes": cfg.max_minutes} if cfg.max_minutes > 0 else None,
        accelerator=accelerator,
        devices=cfg.devices if cfg.devices == "auto" else _parse_devices(cfg.devices),
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=precision,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=min(50, steps_per_epoch),
        default_root_dir=str(out),
        enable_model_summary=is_rank_zero,
        num_sanity_val_steps=0 if use_cache else 1,
    )
    ckpt_path = None
    if resume:
        if last.is_file():
            ckpt_path = str(last)
            log.info("resuming from %s", last)
        else:
            log.warning("--resume: no %s yet, starting from the beginning", last)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    trainer.save_checkpoint(ckpt_dir / "final.ckpt")
    robustness = None
    if trainer.is_global_zero and (ckpt_dir / "best.ckpt").is_file() and len(dm.class_names) == 2 and dm.val_samples:
        robustness = finalize_best(ckpt_dir / "best.ckpt", dm.train_images, dm.val_images, cfg, out)

    summary: dict[str, Any] = {
        "out_dir": str(out),
        "class_names": dm.class_names,
        "data": dm.summary(),
        "failed_during_training": [[str(p), r] for ds in (dm.train_images, dm.val_images)
                                   for p, r in getattr(ds, "failed", [])],
        "backbone_weights": str(weights_report) if weights_report else f"random ({cfg.backbone_weights})",
        "precision": precision,
        "feature_cache": use_cache,
        "epochs_run": trainer.current_epoch,
        "best_checkpoint": str(ckpt_dir / "best.ckpt"),
        "best_val_loss": _float(checkpoint.best_model_score),
        "world_size": trainer.world_size,
    }
    if robustness is not None:
        summary["validation_shift_suite"] = robustness
    if not trainer.is_global_zero:
        return summary
    if evaluate and dm.test_samples:
        from chexformer.evaluate import evaluate_checkpoint

        results = evaluate_checkpoint(ckpt_dir / "best.ckpt", Path(cfg.data_dir) / "test", out / "results",
                                      history_path=out / "history.csv", data_summary=dm.summary())
        summary["test_metrics"] = {k: v for k, v in results.items() if isinstance(v, dict) and "value" in v}
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _log_summary(summary)
    return summary


GUARD_MAX_TRAIN_IMAGES = 1000


def finalize_best(best: Path, train_images, val_images, cfg: Config, out: Path) -> dict[str, Any]:
    """After training, with the best checkpoint: score validation clean, under the robustness
    suite and with TTA; store in the checkpoint the operating threshold of ``cfg.threshold_method``
    (for 'shift_robust': maximal mean Youden J over the clean and the 24 shifted copies), the
    threshold for TTA and the out-of-population guard (fitted on up to 2,000 training images,
    thresholded on validation); write ``OUT/validation_shift_suite.json``. Returns the suite's table."""
    from chexformer import metrics
    from chexformer.guard import fit_guard
    from chexformer.inference import Predictor
    from chexformer.robustness import format_table, robust_threshold, shift_suite_logits, suite_table
    from chexformer.weights import read_checkpoint_file

    start = time.perf_counter()
    predictor = Predictor.from_checkpoint(best, device=str(default_device(cfg.accelerator)), precision=cfg.precision)
    y = np.array([s.label for s in val_images.samples])
    logits = shift_suite_logits(predictor, val_images, seed=cfg.seed)
    probs = {k: predictor.probabilities(v) for k, v in logits.items()}
    youden = float(metrics.choose_threshold(y, probs["clean"], "youden"))
    robust = robust_threshold(y, probs)
    if cfg.threshold_method == "shift_robust":
        threshold = robust
    else:
        threshold = float(metrics.choose_threshold(y, probs["clean"], cfg.threshold_method, cfg.target_sensitivity))
    images = [val_images.uint8(i) for i in range(len(val_images))]
    tta_prob = np.concatenate([predictor.predict_images(images[i:i + 32], tta=True) for i in range(0, len(images), 32)])
    tta_threshold = robust_threshold(y, {"clean": tta_prob}) if cfg.threshold_method == "shift_robust" else \
        float(metrics.choose_threshold(y, tta_prob, cfg.threshold_method, cfg.target_sensitivity))
    step = max(1, len(train_images) // GUARD_MAX_TRAIN_IMAGES)
    guard = fit_guard(predictor, [train_images.uint8(i) for i in range(0, len(train_images), step)], images)
    table = suite_table(y, probs, threshold)
    table.update({"method": cfg.threshold_method, "youden_clean": youden, "shift_robust": robust,
                  "tta_threshold": tta_threshold, "seconds": round(time.perf_counter() - start, 1)})
    obj = read_checkpoint_file(best)
    obj["chexformer"]["threshold"] = threshold
    obj["chexformer"].setdefault("extra", {}).update({
        "tta_threshold": tta_threshold, "threshold_rule": cfg.threshold_method, "guard": guard,
        "validation_shift_suite": {k: v for k, v in table.items() if k != "rows"},
    })
    tmp = best.with_suffix(".ckpt.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, best)
    (out / "validation_shift_suite.json").write_text(json.dumps(table, indent=2))
    log.info("validation under the robustness suite (threshold %.4f, %s; clean Youden %.4f):\n%s",
             threshold, cfg.threshold_method, youden, format_table(table))
    return table


def _parse_devices(devices: str):
    text = str(devices).strip()
    if text.isdigit() or (text.startswith("-") and text[1:].isdigit()):
        return int(text)
    return [int(d) for d in text.split(",") if d.strip()]


def _float(v) -> float | None:
    return None if v is None else float(v)


class RankAgreement(Callback):
    """Under DDP every rank must end with identical weights: checked in ``on_train_end``, while
    the process group and each rank's device are still alive (an NCCL group only reduces CUDA
    tensors, and after ``fit`` returns the group is gone). Writes ``OUT/ddp_check.json``."""

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.world_size < 2:
            return
        checksum = torch.stack([p.detach().double().sum() for p in pl_module.model.parameters()]).sum().reshape(1)
        gathered = pl_module.all_gather(checksum.to(pl_module.device)).flatten().cpu()
        agree = bool(torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=1e-6))
        if trainer.is_global_zero:
            (Path(pl_module.cfg.out_dir) / "ddp_check.json").write_text(json.dumps(
                {"world_size": trainer.world_size, "checksums": gathered.tolist(), "agree": agree,
                 "device": str(pl_module.device), "process_group_alive": torch.distributed.is_initialized(),
                 "feature_cache_device": getattr(trainer.datamodule, "cache_device", None)}))
        if not agree:
            raise RuntimeError(f"DDP ranks disagree on the final weights: parameter checksums {gathered.tolist()}")
        if trainer.is_global_zero:
            log.info("DDP: all %d ranks hold identical weights (checksum %.6f)", trainer.world_size, gathered[0])


def _log_summary(summary: dict[str, Any]) -> None:
    lines = [f"run finished: {summary['out_dir']} ({summary.get('seconds', '?')} s, {summary['epochs_run']} epochs, "
             f"best val_loss {summary['best_val_loss']})"]
    for split, d in summary["data"]["splits"].items():
        lines.append(f"  {split}: {d['images']} images, {d['patients']} patients, {d['per_class']}")
    skipped = summary["data"]["skipped"]
    lines.append(f"  skipped {len(skipped)} unreadable files" + (":" if skipped else ""))
    lines += [f"    {p}: {r}" for p, r in skipped[:50]]
    if len(skipped) > 50:
        lines.append(f"    ... and {len(skipped) - 50} more (see summary.json)")
    failed = summary["failed_during_training"]
    if failed:
        lines.append(f"  {len(failed)} files failed to load during training:")
        lines += [f"    {p}: {r}" for p, r in failed[:50]]
    for k, v in summary.get("test_metrics", {}).items():
        lines.append(f"  test {k}: {v['value']:.4f} (95% CI {v['ci95'][0]:.4f}-{v['ci95'][1]:.4f})"
                     if v.get("value") is not None and v.get("ci95") and None not in v["ci95"]
                     else f"  test {k}: {v.get('value')}")
    log.info("\n".join(lines))
