"""The LightningModule: loss, optimiser, schedule, validation calibration and checkpoint metadata.

In: batches of ``(image or cached feature map, label, index)`` from
:class:`~chexformer.data.datamodule.XrayDataModule`, and the plain model of :mod:`chexformer.model`.
Out: the per-epoch metrics Lightning logs (TensorBoard, :class:`~chexformer.callbacks.HistoryCSV`),
the temperature, bias and threshold fitted on each validation epoch, and the ``chexformer``
metadata every checkpoint carries (:class:`~chexformer.checkpoint.CheckpointMeta`).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid

from chexformer import metrics
from chexformer.checkpoint import IMAGENET_MEAN, IMAGENET_STD, CheckpointMeta
from chexformer.config import Config
from chexformer.explain import top_feature_channels
from chexformer.model import build_model, num_logits
from chexformer.plots import denormalize, normalise01
from chexformer.robustness import robust_threshold

__all__ = ["ChexFormerModule", "group_rates"]

log = logging.getLogger(__name__)


def group_rates(cfg: Config) -> tuple[dict[str, float], dict[str, float]]:
    """Each optimiser parameter group's starting learning rate and floor, by group name: the head
    (and transformer) at ``init_lr``, the trainable backbone at ``init_lr * backbone_lr_scale``;
    the floor is ``min_lr``, or the group's start where that is lower."""
    starts = {"head": cfg.init_lr, "backbone": cfg.init_lr * cfg.backbone_lr_scale}
    return starts, {"head": cfg.min_lr, "backbone": min(cfg.min_lr, starts["backbone"])}


def _cosine_factor(step: int, total: int, floor: float) -> float:
    """The cosine schedule's multiple of the starting rate after ``step`` of ``total`` optimiser
    steps: 1 at the start, ``floor`` (min_lr / start) at the end and after it."""
    t = min(step, total) / total
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def consistency_loss(logits: torch.Tensor) -> torch.Tensor:
    """The Jensen-Shannon divergence between the predicted class distributions of several views of
    each image, averaged over images (AugMix, Hendrycks et al. 2020): ``logits`` (B, V, 1) for
    sigmoid (the distribution is (1 - p, p)) or (B, V, K) for softmax. 0 when the views agree."""
    logits = logits.float()
    if logits.shape[-1] == 1:
        logp = torch.cat((F.logsigmoid(-logits), F.logsigmoid(logits)), dim=-1)  # (B, V, 2)
    else:
        logp = F.log_softmax(logits, dim=-1)
    p = logp.exp()
    log_mean = p.mean(dim=1, keepdim=True).clamp_min(1e-7).log()
    return (p * (logp - log_mean)).sum(-1).mean()


def mixup(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(lam * x + (1 - lam) * x[perm], perm, lam)`` with ``lam ~ Beta(alpha, alpha)`` (one per
    batch) and a random pairing ``perm``, both from torch's global generator (seeded and restored
    on resume like dropout's)."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1.0 - lam) * x[perm], perm, lam


class ChexFormerModule(L.LightningModule):
    """Wraps the plain model for training; knows the loss, optimiser, schedule and metadata."""

    def __init__(self, cfg: Config, class_names: list[str], model: torch.nn.Module | None = None,
                 class_weight: torch.Tensor | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.cfg = cfg
        self.class_names = list(class_names)
        self.binary = num_logits(len(self.class_names)) == 1  # one logit: sigmoid loss
        self.model = model if model is not None else build_model(cfg, len(self.class_names))
        self.register_buffer("class_weight", class_weight, persistent=False)
        self.mean, self.std = tuple(mean), tuple(std)
        self.use_features = False
        # epochs before this one train at cfg.low_res_size (progressive resizing); the epoch budget's
        # plan (low_res_budget) moves it on, epoch by epoch
        self.low_res_until = cfg.low_res_epochs
        self._side: int | None = None  # the side the last epoch trained at (logged when it changes)
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

    @property
    def _distributed(self) -> bool:
        """Training with several processes (a step called outside a Trainer, as in tests, is not)."""
        return self._trainer is not None and self._trainer.world_size > 1

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
        views = 1
        if x.dim() == 5:  # (B, 2, C, H, W): two augmented views of each image (consistency)
            views = x.shape[1]
            x, y = x.flatten(0, 1), y.repeat_interleave(views)
        if self.current_epoch < self.low_res_until:
            side = self.cfg.low_res_size
            # float32: the CPU's antialiased kernel has no bf16 (precision bf16-true hands bf16 batches)
            x = F.interpolate(x.float(), size=(side, side), mode="bilinear", antialias=True,
                              align_corners=False).to(x.dtype)
        if self.cfg.mixup_alpha > 0:
            x, perm, lam = mixup(x, self.cfg.mixup_alpha)
            logits = self._logits(x)
            loss = lam * self._loss(logits, y) + (1.0 - lam) * self._loss(logits, y[perm])
            y = y if lam >= 0.5 else y[perm]  # the training metrics score the larger share's label
        else:
            logits = self._logits(x)
            loss = self._loss(logits, y)
            if views > 1:
                loss = loss + self.cfg.consistency * consistency_loss(logits.view(-1, views, logits.shape[-1]))
        bs = y.shape[0]
        if not self._distributed:  # under DDP from every rank's outputs (on_train_epoch_end)
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
            self.log("train_acc", self._accuracy(logits, y), on_step=False, on_epoch=True, batch_size=bs,
                     sync_dist=True)
        self._train_out.append((logits.detach().float(), y.detach(), loss.detach().float() * bs))
        return loss

    def on_train_epoch_start(self) -> None:
        self._log_grads = True
        self._train_out = []
        side = self.cfg.low_res_size if self.current_epoch < self.low_res_until else self.cfg.img_size
        if side != (self._side or self.cfg.img_size):
            log.info("progressive resizing: epoch %d trains at %d px (validation at %d px)", self.current_epoch + 1,
                     side, self.cfg.img_size)
        self._side = side

    def on_train_epoch_end(self) -> None:
        """This epoch's training loss, accuracy and AUC (as trained: augmented, dropout on), kept
        in :attr:`epoch_train_metrics` for the history; AUC is also logged."""
        if not self._train_out:
            return
        logits = torch.cat([o[0] for o in self._train_out])
        y = torch.cat([o[1] for o in self._train_out])
        loss_sum = sum(o[2] for o in self._train_out)  # in this order: the history's digits stay those on record
        self._train_out = []
        distributed = self._distributed
        if distributed:  # every rank's share (the distributed sampler gives each as many)
            # Its padded repeats (at most world_size - 1 images) stay in, unlike validation's: each was
            # trained on, under its own augmentation, and with class_weighting: sampler repeats are
            # the epoch's own draws, which one device counts too and a dedup by index would remove.
            logits, y = (self.all_gather(t).flatten(0, 1) for t in (logits, y))
            loss_sum = self.all_gather(loss_sum).sum()
        logits, y = logits.cpu(), y.cpu()
        loss = float(loss_sum) / len(y)
        self.epoch_train_metrics = {"train_loss": loss,
                                    "train_acc": float(self._accuracy(logits, y)),
                                    "train_auc": float("nan")}
        if distributed:  # the same on every rank: no sync_dist, whose reduce Lightning runs lazily, when a
            # metric is first read, and its rank-zero-only progress bar reads them before this hook runs
            self.log("train_loss", loss, prog_bar=True, sync_dist=False)
            self.log("train_acc", self.epoch_train_metrics["train_acc"], sync_dist=False)
        y = y.numpy()
        if len(np.unique(y)) < 2:
            return
        auc = metrics.roc_auc(y, logits[:, 0].numpy() if self.binary else torch.softmax(logits, 1).numpy())
        self.epoch_train_metrics["train_auc"] = float(auc)
        self.log("train_auc", float(auc), sync_dist=False)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y, idx = batch
        logits = self._logits(x).float()
        loss = self._loss(logits, y)
        if not self._distributed:  # under DDP from the gathered predictions (on_validation_epoch_end)
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
        if self._distributed:  # every rank sees every prediction once
            logits, labels, index = (self.all_gather(t).flatten(0, 1) for t in (logits, labels, index))
            order = np.unique(index.cpu().numpy(), return_index=True)[1]
            logits, labels = logits[order], labels[order]
            # the loss and accuracy of each image once: the distributed sampler pads a rank's share with
            # repeats, which an average of the ranks' own means would count twice (all ranks log the same,
            # so no sync_dist: see on_train_epoch_end)
            self.log("val_loss", self._loss(logits, labels), prog_bar=True, sync_dist=False)
            self.log("val_acc", self._accuracy(logits, labels), prog_bar=True, sync_dist=False)
        auc = self._fit_threshold(logits.cpu(), labels.cpu())
        if not self.trainer.sanity_checking:
            self.validated_epoch = int(self.current_epoch)
        self.log("val_auc", auc, prog_bar=True, sync_dist=False, rank_zero_only=False)
        self._log_images()

    def _fit_threshold(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """Temperature and decision threshold from this epoch's validation predictions."""
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
            else:  # Youden's J on clean validation, middle of its best range; shift_* cuts are set after training
                self.threshold = robust_threshold(y, {"clean": prob})
        else:
            self.temperature = float(metrics.fit_temperature(lg, y, multiclass=True))
            prob = metrics.apply_temperature(lg, self.temperature, multiclass=True)
        self.val_auc = metrics.roc_auc(y, prob)
        return self.val_auc

    # --- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.cfg
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        head = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("backbone.")]
        starts, floors = group_rates(cfg)
        groups = [{"params": head, "lr": starts["head"], "name": "head"}]
        min_lrs = [floors["head"]]
        if backbone:
            groups.append({"params": backbone, "lr": starts["backbone"], "name": "backbone"})
            min_lrs.append(floors["backbone"])
        # fused AdamW: one kernel for all parameters (CPU and CUDA), several times faster than the loop
        optimizer = torch.optim.AdamW(groups, lr=cfg.init_lr, weight_decay=cfg.weight_decay, fused=True)
        if cfg.lr_schedule == "cosine":
            total = max(1, int(self.trainer.estimated_stepping_batches))  # the whole epochs budget
            factors = [functools.partial(_cosine_factor, total=total, floor=m / g["lr"] if g["lr"] > 0 else 1.0)
                       for m, g in zip(min_lrs, groups)]
            # LambdaLR, not CosineAnnealingLR: its one eta_min would raise a group that starts below min_lr
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
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
        # under 16-mixed a fused optimizer unscales inside its own step, so Lightning hands this hook the
        # loss-scaled gradients (other optimizers are unscaled before it). `_step_supports_amp_scaling`
        # is the flag torch's GradScaler.step itself reads to decide this (and Lightning's own check)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        scale = float(scaler.get_scale()) if scaler is not None and fused else 1.0
        parts: dict[str, list[torch.Tensor]] = {}
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                key = ".".join(name.split(".")[:2]) if name.startswith(("backbone.", "layers.")) else name.split(".")[0]
                parts.setdefault(key, []).append(p.grad.detach().flatten().float() / scale)
        for key, grads in parts.items():
            self.logger.experiment.add_histogram(f"gradients/{key}", torch.cat(grads).cpu(), self.current_epoch)

    def _log_images(self) -> None:
        every = self.cfg.log_images_every
        if (not every or self.current_epoch % every or self.explain_images is None
                or not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking):
            return
        x = self.explain_images.to(self.device)
        xm = x.to(self.dtype)  # the weights' dtype: bf16 under precision bf16-true, where Lightning casts them
        tb = self.logger.experiment
        images = denormalize(x, self.mean, self.std)
        tb.add_image("inputs", make_grid(images, nrow=len(x)), self.current_epoch)
        feats = self.model.feature_maps(xm).float()  # (B, 1024, h, w)
        top = top_feature_channels(feats, k=8)  # (B, 8): the most active channels per image
        maps = torch.stack([feats[i, top[i]] for i in range(len(x))])  # (B, 8, h, w)
        maps = _per_map_01(F.interpolate(maps, size=x.shape[-2:], mode="nearest"))
        tb.add_image("feature_maps", make_grid(maps.flatten(0, 1).unsqueeze(1), nrow=8), self.current_epoch)
        if hasattr(self.model, "attention_maps") and getattr(self.model, "layers", None):
            attn = self.model.attention_maps(xm)[-1].float()  # (B, heads, 1+N, 1+N), last layer
            h = w = feats.shape[-1]
            cls = attn[:, :, 0, 1:].reshape(len(x), -1, h, w)  # class token -> spatial tokens
            cls = _per_map_01(F.interpolate(cls, size=x.shape[-2:], mode="bilinear", align_corners=False))
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
        stored = meta.get("config", {})
        schedules = (stored.get("lr_schedule", "plateau"), self.cfg.lr_schedule)
        if "cosine" in schedules and (schedules[0] != schedules[1] or stored.get("epochs") != self.cfg.epochs):
            log.warning("resuming a run trained with lr_schedule=%s over %s epochs as lr_schedule=%s over %d: the "
                        "cosine curve spans the whole budget, so the rate jumps where the two curves differ and the "
                        "continued run is not the run this config would train from the start",
                        schedules[0], stored.get("epochs"), schedules[1], self.cfg.epochs)
        annealed = int(stored.get("final_anneal_epochs", 0) or 0)
        end = stored.get("epochs")
        if annealed and end is not None and end != self.cfg.epochs and self.validated_epoch >= end - annealed:
            log.warning("resuming a run whose last %d epochs were annealed for an end at epoch %d, with epochs=%d: "
                        "the continued run is not the run this config would train from the start (its rate "
                        "went down for an end that is no longer the end)", annealed, end, self.cfg.epochs)


def _per_map_01(t: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map of a stack min-max scaled to 0..1 (:func:`~chexformer.plots.normalise01`), as a CPU tensor."""
    return torch.from_numpy(normalise01(t, axes=(-2, -1))).float()
