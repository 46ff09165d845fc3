"""Lightning callbacks of a training run: history.csv, EMA weights, the random generators' state
in every checkpoint, and the DDP agreement check.

In: the trainer's logged metrics and the module's epoch averages after every epoch; the weights of
every rank at the end of training. Out: ``OUT/history.csv`` (one row per epoch),
exponentially averaged weights that Lightning validates and checkpoints, the generators' state
that ``--resume`` restores, and ``OUT/ddp_check.json`` under DDP.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from chexformer.history import read_history, write_history

log = logging.getLogger(__name__)

__all__ = ["EMA", "HistoryCSV", "RankAgreement", "RngState"]


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


class RngState(Callback):
    """Carries the torch, NumPy, Python (and CUDA) generators' state in every checkpoint, so that
    a run continued with ``--resume`` retraces the uninterrupted run: same data order, same
    augmentation, same dropout. Lightning checkpoints the weights, optimiser, schedulers and
    callbacks, not the generators; without this the continued epoch draws from the state that
    ``seed_everything`` left at start-up.

    The state is the one at the end of the saved epoch (after its validation); it is put back in
    ``on_fit_start``, before the first training batch is drawn. Exact with ``num_workers: 0``
    (the recipe): persistent loader workers keep their own generators, which are not saved.
    A checkpoint written before this callback existed resumes with a warning."""

    def __init__(self) -> None:
        self._loaded: dict | None = None

    def state_dict(self) -> dict:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "gauss": float(gauss)}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._loaded = state_dict

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._loaded is None:
            if trainer.ckpt_path:
                log.warning("%s carries no random generator state (written by an older chexformer): the continued "
                            "run will not retrace an uninterrupted one exactly", trainer.ckpt_path)
            return
        state, self._loaded = self._loaded, None
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


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
