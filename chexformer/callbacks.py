"""Lightning callbacks of a training run: history.csv, EMA weights and the DDP agreement check.

In: the trainer's logged metrics and the module's epoch averages after every epoch; the weights of
every rank at the end of training. Out: ``OUT/history.csv`` (one row per epoch),
exponentially averaged weights that Lightning validates and checkpoints, and
``OUT/ddp_check.json`` under DDP.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from chexformer.history import read_history, write_history

log = logging.getLogger(__name__)

__all__ = ["EMA", "HistoryCSV", "RankAgreement"]


class HistoryCSV(Checkpoint):
    """``history.csv``: one row of metrics per epoch, rewritten atomically after each epoch.

    The train columns are the module's own averages over this epoch's batches
    (:attr:`ChexFormerModule.epoch_train_metrics`), the val columns this epoch's validation.
    Subclassing :class:`Checkpoint` makes Lightning call this after the module's
    ``on_train_epoch_end`` (as for ModelCheckpoint), so every row belongs to one epoch.
    """

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
        write_history(self.path, rows)


class EMA(WeightAveraging):
    """Exponential moving average of every parameter and buffer, updated after each optimiser
    step; Lightning validates and checkpoints the averaged weights."""

    def __init__(self, decay: float) -> None:
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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
