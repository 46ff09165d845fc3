"""Train a model end to end: ``train(cfg)`` as a few named steps, then ``finalize_best``.

In: a :class:`~chexformer.config.Config` whose ``data_dir`` holds ``train/`` (optionally ``val/``
and ``test/``, see :data:`~chexformer.data.scan.LAYOUT`). Out: the run folder ``OUT/``
(``cfg.out_dir``), which holds ``config.yaml`` (resolved), ``split.csv``,
``checkpoints/best.ckpt`` (the selected weights, by ``cfg.checkpoint_selection``: lowest
validation loss, or the end of the epoch budget with ``lowest_val_loss.ckpt`` beside it; then
finalised with the operating threshold, the TTA threshold and the out-of-population guard),
``checkpoints/last.ckpt`` (every epoch, for ``--resume``), ``checkpoints/final.ckpt`` (the weights
training ended with), ``tensorboard/``, ``history.csv``, ``validation_shift_suite.json``,
``results/`` (evaluation on ``test/``) and ``summary.json``. Checkpoints are written atomically
(temporary file, then rename), so a kill at any moment leaves the previous complete file in place.

The pieces live elsewhere: the data in :mod:`chexformer.data.datamodule`, the LightningModule in
:mod:`chexformer.module`, the callbacks in :mod:`chexformer.callbacks`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from chexformer import metrics
from chexformer.callbacks import EMA, SWA, EpochBudget, FinalAnneal, HistoryCSV, RankAgreement, ResumeState
from chexformer.config import Config, ConfigError
from chexformer.data.datamodule import XrayDataModule
from chexformer.data.scan import write_split_csv
from chexformer.evaluate import evaluate_checkpoint
from chexformer.guard import fit_guard
from chexformer.inference import Predictor
from chexformer.model import build_model
from chexformer.module import ChexFormerModule, group_rates
from chexformer.robustness import (
    SHIFT_RULES,
    format_table,
    operating_threshold,
    robust_threshold,
    shift_suite_logits,
    suite_table,
)
from chexformer.runtime import default_device, host_environment, resolve_accelerator, resolve_precision
from chexformer.weights import init_backbone, read_checkpoint_file

log = logging.getLogger(__name__)

__all__ = ["ChexFormerModule", "XrayDataModule", "train", "RunExistsError", "finalize_best"]

GUARD_MAX_TRAIN_IMAGES = 1000
MIN_GUARD_IMAGES = 20
"""Fewer training or validation images than this: no guard (logged, and summary.json says so)."""


class RunExistsError(FileExistsError):
    """The output folder already holds a run's checkpoints."""


@dataclass(frozen=True)
class RunFolder:
    """The paths of a run folder ``OUT/``."""

    out: Path

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def final(self) -> Path:
        return self.checkpoints / "final.ckpt"

    @property
    def history(self) -> Path:
        return self.out / "history.csv"


# ----------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------
def train(cfg: Config, *, resume: bool = False, evaluate: bool = True) -> dict[str, Any]:
    """Train on ``cfg.data_dir``, write the run folder ``cfg.out_dir``, evaluate on ``test/``.

    Returns the run summary (also written to ``OUT/summary.json``)."""
    start = time.perf_counter()
    run = RunFolder(Path(cfg.out_dir))
    not_rank_zero_on_other_nodes()
    refuse_to_overwrite(run, resume)
    if cfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"accelerator={cfg.accelerator} was asked for, but torch sees no CUDA GPU on this machine; "
                          "use --accelerator cpu or auto (mps on Apple silicon)")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_data(cfg)
    accelerator = resolve_accelerator(cfg.accelerator)
    precision = resolve_precision(cfg.precision, accelerator)
    module, weights_report = build_module(cfg, dm, run, precision)
    if resume:
        check_resumable(run, module, cfg)
    build_images(module, dm)
    prepare_run_folder(run, cfg, dm)
    trainer, best = build_trainer(cfg, dm, run, accelerator, precision, cached=module.use_features)
    fit(trainer, module, dm, run, resume)
    suite = None
    if trainer.is_global_zero and run.best.is_file() and len(dm.class_names) == 2 and dm.val_samples:
        suite = finalize_best(run.best, dm.train_images, dm.val_images, cfg, run.out, precision)
    summary = run_summary(cfg, dm, run, trainer, best, weights_report, precision, module.use_features, suite)
    if not trainer.is_global_zero:
        return summary
    if evaluate and dm.test_samples:
        summary["test_metrics"] = evaluate_on_test(cfg, dm, run)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _log_summary(summary)
    return summary


# ----------------------------------------------------------------------------------------------
# The steps, in order
# ----------------------------------------------------------------------------------------------
def refuse_to_overwrite(run: RunFolder, resume: bool) -> None:
    """A run folder that already holds checkpoints is only continued, with ``resume``."""
    if not resume and any(p.exists() for p in (run.best, run.last, run.final)):
        raise RunExistsError(
            f"{run.out} already holds a run's checkpoints. Pass --resume to continue it, or choose another --out-dir."
        )


def check_resumable(run: RunFolder, module: ChexFormerModule, cfg: Config) -> None:
    """Before ``--resume`` writes anything: ``last.ckpt`` must be readable and hold the weights of
    the model ``cfg`` builds, so that a changed option (``--d-model``, ``--num-layers``, ...) is one
    clear error naming it, and the run's ``config.yaml`` is not rewritten to a config its
    checkpoint cannot continue."""
    if not run.last.is_file():
        return
    obj = read_checkpoint_file(run.last)  # missing / truncated / not a checkpoint: one clear error
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"--resume: {run.last} is not a training checkpoint (no state_dict); "
                          "train into a new --out-dir")
    mine = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    if mine == theirs:
        return
    stored = (obj.get("chexformer") or {}).get("config") or {}
    changed = [f"{k}: {stored[k]!r} in the run, {v!r} now" for k, v in cfg.to_dict().items()
               if k in stored and stored[k] != v and k not in ("out_dir", "data_dir")]
    differing = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    raise ConfigError(
        f"--resume: {run.last} holds another model than this config builds ({len(differing)} tensors differ, "
        f"e.g. {differing[0]}: {theirs.get(differing[0])} in the checkpoint, {mine.get(differing[0])} now). "
        + (f"Options that differ from the run's (not all change the model): {'; '.join(changed)}. "
           if changed else "")
        + "Resume without the options that change the model, or train into a new --out-dir."
    )


def build_data(cfg: Config) -> XrayDataModule:
    """The DataModule with every file scanned and split by patient (nothing written yet)."""
    dm = XrayDataModule(cfg)
    dm.scan()
    return dm


def not_rank_zero_on_other_nodes() -> None:
    """Lightning reads a process's rank from the launcher's environment at import (``RANK``,
    ``LOCAL_RANK``, ``SLURM_PROCID``, ...) and sets it exactly only when the Trainer is built. Under
    Lightning's own launcher on several nodes, the first process of node k > 0 has only
    ``NODE_RANK``, so until then it would act as rank zero: write ``config.yaml``, ``split.csv`` and
    a TensorBoard event file beside node 0's. Mark it not rank zero (the Trainer sets the exact rank)."""
    from lightning_utilities.core.rank_zero import rank_zero_only as utils_rank_zero_only

    node = int(os.environ.get("NODE_RANK") or 0)
    if node > 0 and rank_zero_only.rank == 0:
        rank_zero_only.rank = utils_rank_zero_only.rank = node


def prepare_run_folder(run: RunFolder, cfg: Config, dm: XrayDataModule) -> None:
    """Create ``OUT/`` and, on rank zero, write the resolved ``config.yaml`` and ``split.csv``."""
    run.out.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # Lightning reads it from the launcher's environment
        cfg.save(run.out / "config.yaml")
        write_split_csv(run.out / "split.csv", dm.train_samples, dm.val_samples, dm.test_samples or None,
                        dm.class_names)


def build_module(cfg: Config, dm: XrayDataModule, run: RunFolder, precision: str) -> tuple[ChexFormerModule, Any]:
    """The model with its backbone weights, wrapped for training; returns it and the weights report.

    With a fully frozen backbone (and ``cache_features`` on) the DataModule is asked to serve
    cached backbone maps instead of images; with ``compile`` the model is compiled in place. The
    images are built afterwards (:func:`build_images`), once ``--resume`` has been checked."""
    model = build_model(cfg, num_classes=len(dm.class_names))
    weights_report = init_backbone(model, cfg)
    module = ChexFormerModule(cfg, dm.class_names, model, class_weight=dm.class_weights())
    if cfg.channels_last:
        module.model.to(memory_format=torch.channels_last)
    if model.backbone_frozen and cfg.cache_features != "off":
        cache_dir = None
        if cfg.cache_features == "disk":
            cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run.out / "feature_cache"
        if cfg.low_res_epochs or cfg.low_res_budget:
            raise ConfigError("progressive resizing (low_res_epochs, low_res_budget) scales training images down, "
                              f"but with a frozen backbone and cache_features={cfg.cache_features} training reads "
                              "cached backbone maps: set cache_features off, or turn progressive resizing off")
        if cfg.consistency > 0:
            raise ConfigError("consistency compares two augmented views of each training image, but with a frozen "
                              f"backbone and cache_features={cfg.cache_features} training reads cached backbone "
                              "maps: set cache_features off, or consistency to 0")
        dm.cache_request = {"model": model, "cache_dir": cache_dir, "precision": precision}  # built in setup()
        module.use_features = True
    if cfg.compile:
        _compile(module)
    return module, weights_report


def build_images(module: ChexFormerModule, dm: XrayDataModule) -> None:
    """The image datasets (decoded, and preloaded where asked: the slow part of setting up), the
    data summary (with the training images' sharpness) and a few validation images for TensorBoard."""
    dm.build_images()
    module.data_summary = dm.summary()
    n_explain = min(4, len(dm.val_images))
    module.explain_images = torch.stack([dm.val_images[i][0] for i in range(n_explain)]) if n_explain else None


def build_logger(cfg: Config, out: Path):
    """Lightning's logger of ``cfg.logger``, with the resolved config recorded as hyperparameters."""
    if cfg.logger == "csv":
        logger = CSVLogger(save_dir=str(out), name="csv", version="")
    elif cfg.logger == "mlflow":
        try:
            import mlflow  # noqa: F401  (local: optional dependency, checked before Lightning needs it)
        except ImportError:
            raise ConfigError("logger: 'mlflow' needs the mlflow package: pip install mlflow") from None
        logger = MLFlowLogger(experiment_name="chexformer", run_name=out.name,
                              tracking_uri=(out / "mlruns").resolve().as_uri())
    else:
        logger = TensorBoardLogger(save_dir=str(out), name="tensorboard", version="", default_hp_metric=False)
    logger.log_hyperparams(cfg.to_dict())
    return logger


def build_trainer(cfg: Config, dm: XrayDataModule, run: RunFolder, accelerator: str, precision: str,
                  cached: bool) -> tuple[L.Trainer, ModelCheckpoint]:
    """The Lightning Trainer with its callbacks and TensorBoard logger; also returns the callback
    that keeps ``best.ckpt``."""
    by_loss = cfg.checkpoint_selection == "val_loss"
    # 'last' monitors the epoch number (highest wins), which keeps its state key apart from last.ckpt's
    best = ModelCheckpoint(
        dirpath=run.checkpoints, filename="best", monitor="val_loss" if by_loss else "epoch",
        mode="min" if by_loss else "max", save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
    )
    # A separate callback for last.ckpt: Lightning's save_last only writes it in epochs that also
    # improved the monitored metric, and a resume must lose at most the epoch in progress.
    last = ModelCheckpoint(
        dirpath=run.checkpoints, filename="last", monitor=None, save_top_k=1, every_n_epochs=1,
        auto_insert_metric_name=False, enable_version_counter=False,
    )
    progressive = cfg.low_res_epochs > 0 or cfg.low_res_budget
    # the reserve counts single-view epochs; a two-view (consistency) epoch is about two of them
    views = 2 if cfg.consistency > 0 else 1
    budget = EpochBudget(cfg.epoch_budget_minutes, reserve=cfg.epoch_budget_reserve / views,
                         low_res_ratio=(cfg.low_res_size / cfg.img_size) ** 2 if progressive else None,
                         plan=cfg.low_res_budget) \
        if cfg.epoch_budget_minutes > 0 else None
    # always there (inert at 0 epochs): a resume that turns the anneal off still hears about an annealed epoch
    anneal = FinalAnneal(cfg.final_anneal_epochs, cfg.lr_factor, *group_rates(cfg), budget=budget)
    # Lightning moves Checkpoint subclasses to the end and keeps their order: HistoryCSV goes first,
    # so an epoch's row is on disk before its checkpoints and a kill between the two cannot leave a
    # last.ckpt whose epoch history.csv lacks (a resume would skip that row for good). The budget and
    # the anneal go before the rate monitor (hooks run in list order): an epoch's caps are in place
    # when LearningRateMonitor logs its rate at the epoch's start.
    callbacks = [
        HistoryCSV(run.history),
        best,
        last,
        *([budget] if budget is not None else []), anneal,
        LearningRateMonitor(logging_interval="epoch"),
        RankAgreement(),
        ResumeState(seed=cfg.seed),
    ]
    if by_loss:
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=cfg.patience))
    else:  # the model is the end of the budget; the lowest-loss epoch is kept for comparison
        callbacks.append(ModelCheckpoint(
            dirpath=run.checkpoints, filename="lowest_val_loss", monitor="val_loss", mode="min", save_top_k=1,
            auto_insert_metric_name=False, enable_version_counter=False,
        ))
    if cfg.ema_decay > 0:
        callbacks.insert(0, EMA(cfg.ema_decay))
    if cfg.swa_epochs > 0:
        callbacks.insert(0, SWA(start_epoch=cfg.epochs - cfg.swa_epochs))
    logger = build_logger(cfg, run.out)
    steps_per_epoch = max(1, len(dm.train_dataloader()))
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
        default_root_dir=str(run.out),
        enable_model_summary=rank_zero_only.rank == 0,
        num_sanity_val_steps=0 if cached else 1,
    )
    return trainer, best


def fit(trainer: L.Trainer, module: ChexFormerModule, dm: XrayDataModule, run: RunFolder, resume: bool) -> None:
    """Train (from ``last.ckpt`` with ``resume``), then save ``final.ckpt``."""
    ckpt_path = None
    if resume:
        if run.last.is_file():
            ckpt_path = str(run.last)
            log.info("resuming from %s", run.last)
        else:
            log.warning("--resume: no %s yet, starting from the beginning", run.last)
    if trainer.world_size > 1 and trainer.is_global_zero:
        cfg = module.cfg  # the learning rate and schedule are the config's, measured on one device
        (log.warning if cfg.devices == "auto" else log.info)(
            "data-parallel training on %d processes (devices=%s, num_nodes=%d): a step averages %d x %d = %d images "
            "at init_lr=%g, the rate configured for one device's batch of %d, and an epoch has %dx fewer steps",
            trainer.world_size, cfg.devices, cfg.num_nodes, trainer.world_size, cfg.batch_size,
            trainer.world_size * cfg.batch_size, cfg.init_lr, cfg.batch_size, trainer.world_size)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    trainer.save_checkpoint(run.final)  # ends with a barrier: every rank has trained and saved
    release_process_group(trainer)


def release_process_group(trainer: L.Trainer) -> None:
    """After ``fit`` nothing is collective (rank zero scores the suite and the test split alone),
    so every rank destroys its process group here. Lightning does so at exit only for NCCL; a gloo
    group (DDP on CPUs) left to interpreter shutdown can abort the process (SIGABRT, "terminate
    called without an active exception": its worker threads outlive the interpreter,
    pytorch/pytorch#179291), and on rank > 0, which returns while rank zero still works, Lightning
    then kills the whole run."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        log.info("DDP: rank %d released its process group", trainer.global_rank)


def finalize_best(best: Path, train_images, val_images, cfg: Config, out: Path,
                  precision: str = "32") -> dict[str, Any]:
    """After training, with the best checkpoint: score validation clean, under the robustness
    suite and with TTA, in the run's training ``precision`` (bf16 autocast where the run trained in
    bf16, the recipe on a CPU with AMX; the guard's features stay float32, as it scores them at
    prediction); store in the checkpoint the operating threshold of ``cfg.threshold_method`` (for
    'shift_robust': maximal mean Youden J over the clean and the 24 shifted copies; for
    'shift_worst': maximal smallest J over them), the threshold for TTA and the out-of-population
    guard (fitted on up to 1,000 training images, thresholded on validation); write
    ``OUT/validation_shift_suite.json`` (with the precision and each step's seconds). Returns the
    suite's table."""
    start = time.perf_counter()
    predictor = Predictor.from_checkpoint(best, device=str(default_device(cfg.accelerator)), precision=precision)
    y = np.array([s.label for s in val_images.samples])
    logits = shift_suite_logits(predictor, val_images, seed=cfg.seed)
    probs = {k: predictor.probabilities(v) for k, v in logits.items()}
    threshold, cuts = operating_threshold(y, probs, cfg.threshold_method, cfg.target_sensitivity)
    laps = [start, time.perf_counter()]  # the end of each step: suite, TTA, guard
    images = [val_images.uint8(i) for i in range(len(val_images))]
    tta_prob = np.concatenate([predictor.predict_images(images[i:i + 32], tta=True) for i in range(0, len(images), 32)])
    tta_threshold = robust_threshold(y, {"clean": tta_prob}) if cfg.threshold_method in SHIFT_RULES else \
        float(metrics.choose_threshold(y, tta_prob, cfg.threshold_method, cfg.target_sensitivity))
    laps.append(time.perf_counter())
    guard = None
    if len(train_images) >= MIN_GUARD_IMAGES and len(images) >= MIN_GUARD_IMAGES:
        step = max(1, len(train_images) // GUARD_MAX_TRAIN_IMAGES)
        guard = fit_guard(predictor, [train_images.uint8(i) for i in range(0, len(train_images), step)], images)
    else:
        log.warning("out-of-population guard NOT fitted: it needs at least %d training and %d validation images "
                    "(got %d and %d); predictions will carry no ood_score", MIN_GUARD_IMAGES, MIN_GUARD_IMAGES,
                    len(train_images), len(images))
    laps.append(time.perf_counter())
    steps = dict(zip(("suite", "tta", "guard"), np.diff(laps)))
    table = suite_table(y, probs, threshold)
    table.update({"method": cfg.threshold_method, **cuts, "precision": predictor.precision,
                  "tta_threshold": tta_threshold, "guard_fitted": guard is not None,
                  "seconds": round(time.perf_counter() - start, 1),
                  "seconds_per_step": {k: round(float(v), 1) for k, v in steps.items()}})
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
    log.info("validation under the robustness suite (threshold %.4f, %s; clean Youden %.4f; scored in %s; "
             "suite %.0f s, TTA %.0f s, guard %.0f s):\n%s", threshold, cfg.threshold_method, cuts["youden_clean"],
             predictor.precision, steps["suite"], steps["tta"], steps["guard"], format_table(table))
    return table


def run_summary(cfg: Config, dm: XrayDataModule, run: RunFolder, trainer: L.Trainer, best: ModelCheckpoint,
                weights_report: Any, precision: str, cached: bool, suite: dict[str, Any] | None) -> dict[str, Any]:
    """What the run did: data, skipped and failed files, weights, precision, epochs, best checkpoint."""
    summary: dict[str, Any] = {
        "out_dir": str(run.out),
        "class_names": dm.class_names,
        "data": dm.summary(),
        "failed_during_training": [[str(p), r] for ds in (dm.train_images, dm.val_images)
                                   for p, r in getattr(ds, "failed", [])],
        "backbone_weights": str(weights_report) if weights_report else f"random ({cfg.backbone_weights})",
        "precision": precision,
        "feature_cache": cached,
        "epochs_run": trainer.current_epoch,
        **_time_budget(cfg, trainer),
        "best_checkpoint": str(run.best),
        "checkpoint_selection": cfg.checkpoint_selection,
        "best_val_loss": _float(best.best_model_score if best.monitor == "val_loss"
                                 else trainer.callback_metrics.get("val_loss")),
        "world_size": trainer.world_size,
        # the same seed and code can train another model on another CPU
        "environment": host_environment(trainer.strategy.root_device),
    }
    if suite is not None:
        summary["validation_shift_suite"] = suite
    return summary


def evaluate_on_test(cfg: Config, dm: XrayDataModule, run: RunFolder) -> dict[str, Any]:
    """Evaluate ``best.ckpt`` on ``DATA/test`` into ``OUT/results``; returns the headline metrics."""
    results = evaluate_checkpoint(run.best, Path(cfg.data_dir) / "test", run.out / "results",
                                  history_path=run.history, data_summary=dm.summary())
    return {k: v for k, v in results.items() if isinstance(v, dict) and "value" in v}


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _compile(module: ChexFormerModule) -> None:
    """torch.compile the backbone (unless its maps are cached) and each encoder layer, in place."""
    # nn.Module.compile compiles in place and keeps state-dict keys, so checkpoints stay portable.
    target = module.model if not module.use_features else None
    if target is not None:
        target.backbone.compile()
    for layer in getattr(module.model, "layers", []):
        layer.compile()
    log.info("torch.compile: backbone%s and encoder layers compiled (first steps are slow)",
             " (skipped: cached features)" if module.use_features else "")


def _parse_devices(devices: str):
    text = str(devices).strip()
    if text.isdigit() or (text.startswith("-") and text[1:].isdigit()):
        return int(text)
    return [int(d) for d in text.split(",") if d.strip()]


def _time_budget(cfg: Config, trainer: L.Trainer) -> dict[str, Any]:
    """``{"time_budget": ...}`` when ``epoch_budget_minutes`` is set: the budget and the last epoch
    it let train (0-based; None when the run trained all its ``epochs``), and the early probe's projected
    number of epochs (None where it did not probe)."""
    budget = next((c for c in trainer.callbacks if isinstance(c, EpochBudget)), None)
    if budget is None:
        return {}
    return {"time_budget": {"minutes": cfg.epoch_budget_minutes, "reserve": budget.reserve,
                            "epochs": cfg.epochs, "stopped_after_epoch": budget.stopped_after,
                            "projected_epochs": budget.projected_epochs, "low_res_epochs": budget.low_res_epochs}}


def _float(v) -> float | None:
    return None if v is None else float(v)


def _log_summary(summary: dict[str, Any]) -> None:
    lines = [f"run finished: {summary['out_dir']} ({summary.get('seconds', '?')} s, {summary['epochs_run']} epochs, "
             f"best val_loss {summary['best_val_loss']})"]
    budget = summary.get("time_budget")
    if budget and budget["stopped_after_epoch"] is not None:
        reserve = f", reserve {budget['reserve']:g} longest epochs" if budget.get("reserve") else ""
        lines.append(f"  SHORTENED by epoch_budget_minutes={budget['minutes']:g}{reserve}: {summary['epochs_run']} of "
                     f"{budget['epochs']} epochs trained")
    if budget and budget.get("low_res_epochs"):
        small = budget["low_res_epochs"]
        lines.append(f"  PROGRESSIVE: epochs {small[0] + 1}-{small[-1] + 1} trained at low_res_size, the others at "
                     "img_size")
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
