"""Run configuration: one dataclass, loaded from YAML, overridden from the command line, validated.

Every parameter of the original seed script is a field with its name in lower case
(``img_size``, ``batch_size``, ...). The resolved config is written into every run folder so
that a run can be reproduced from that file alone.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import math
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = ["Config", "ConfigError", "load_config", "add_config_arguments", "config_from_args", "overrides_from_args",
           "field_docs", "field_choices"]


class ConfigError(ValueError):
    """A config file or command-line override that cannot be used; the message lists every problem."""


# Kermany file names: personNNN_bacteria_MMM / personNNN_virus_MMM -> personNNN;
# IM-XXXX-NNNN, NORMAL2-IM-XXXX-NNNN -> IM-XXXX.
DEFAULT_PATIENT_REGEX = r"(person\d+)|(IM-\d+)(?=-\d+)"


@dataclass
class Config:
    """Everything a run needs. Field names of the seed script are kept, in lower case."""

    # --- image and batches -------------------------------------------------------------------
    img_size: int = 224
    """Square input side in pixels; a multiple of 32 (DenseNet121 downsamples by 32)."""
    batch_size: int = 16
    """Images per training step on each device."""
    validation_split: float = 0.2
    """Fraction of ``train/`` held out for validation, grouped by patient, stratified by class."""
    min_val_per_class: int = 30
    """A supplied ``val/`` folder is used only if every class has at least this many images
    (fewer cannot choose a threshold, calibrate or early-stop); otherwise it is set aside with a
    warning and the patient split of ``train/`` is used."""
    allow_patient_overlap: bool = False
    """Allow the same patient (id in the file name, or a byte-identical file) in more than one of
    train/val/test; by default that is an error."""

    # --- transformer -------------------------------------------------------------------------
    arch: Literal["hybrid", "linear"] = "hybrid"
    """'hybrid' (DenseNet121 + Transformer, the chexformer model) or 'linear' (DenseNet121 with a
    pooled linear head, the ablation baseline)."""
    d_model: int = 256
    """Token width of the encoder (the 1024 backbone channels are projected to it); a multiple of
    num_heads."""
    num_heads: int = 8
    """Attention heads per encoder layer."""
    ffn_dim: int = 512
    """Hidden width of the feed-forward block in each encoder layer."""
    num_layers: int = 2
    """Transformer encoder layers (0: the projected tokens go straight to the head)."""
    dropout_rate: float = 0.2
    """Dropout in the encoder's feed-forward and residual branches, after the positional
    encoding and before the classifier."""
    attn_dropout: float = 0.0
    """Dropout on the attention weights; 0 (as in ViT) keeps the fused attention kernel."""

    # --- optimisation ------------------------------------------------------------------------
    init_lr: float = 1e-4
    """AdamW learning rate of the transformer and head."""
    backbone_lr_scale: float = 0.1
    """Unfrozen backbone stages train at ``init_lr * backbone_lr_scale``."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    epochs: int = 30
    """Maximum number of training epochs (early stopping may end training sooner)."""
    min_lr: float = 1e-6
    """The lowest learning rate: ReduceLROnPlateau's floor, the cosine schedule's end."""
    max_minutes: float = 0.0
    """Stop training after this many minutes (0 = no limit), in the middle of an epoch if need be;
    the best checkpoint is kept."""
    epoch_budget_minutes: float = 0.0
    """A time budget kept in whole epochs (0 = none): after each epoch, training stops if one more,
    as long as the longest so far, would end more than this many minutes after training began (in
    this process; a --resume starts the clock again). On a slower machine a fixed ``epochs`` budget
    then trains fewer epochs instead of overrunning; logged, and recorded in summary.json
    (``time_budget``)."""
    epoch_budget_reserve: float = 0.0
    """With ``epoch_budget_minutes``: keep this many longest epochs of the budget free for the steps
    after training (robustness suite, TTA, guard; forward passes whose time scales with the machine
    as an epoch's does), so the budget holds for the whole run, not only for training. 0 = the
    budget is for training alone; inert while ``epoch_budget_minutes`` is 0 (no budget), so
    ``--epoch-budget-minutes 0`` turns the recipe's budget off whole. Counted in single-view
    epochs: with ``consistency`` an epoch trains two views of each image (about twice as long)
    while those steps still score one, so the budget keeps half as many of its longest epochs free
    (measured: the steps after training took 2.3 single-view or 1.1 two-view epochs, 128 px)."""
    patience: int = 5
    """Early stopping: epochs without a lower validation loss before training stops (only with
    ``checkpoint_selection: val_loss``)."""
    checkpoint_selection: Literal["val_loss", "last"] = "val_loss"
    """Which weights become ``best.ckpt``, the model the run hands out: 'val_loss' = the epoch
    with the lowest validation loss (training stops early after ``patience`` epochs without a
    lower one); 'last' = the weights at the end of the fixed ``epochs`` budget, no early stopping
    (the lowest-loss epoch is still kept as ``lowest_val_loss.ckpt``, for comparison)."""
    lr_schedule: Literal["plateau", "cosine"] = "plateau"
    """'plateau': ReduceLROnPlateau on validation loss (``lr_patience``, ``lr_factor``, ``min_lr``);
    'cosine': the rate falls from its start to ``min_lr`` along a half cosine over the ``epochs``
    budget, stepped every batch, whatever validation loss does (the curve ends early if early
    stopping or ``max_minutes`` ends training first)."""
    lr_patience: int = 2
    """ReduceLROnPlateau: epochs without improvement before the rate is multiplied by lr_factor."""
    lr_factor: float = 0.3
    """ReduceLROnPlateau multiplies the learning rate by this when validation loss stalls."""
    final_anneal_epochs: int = 0
    """End every run annealed (0 = off): the last k epochs train at most at the starting rate times
    ``lr_factor``, ``lr_factor**2``, ..., ``lr_factor**k`` (never below ``min_lr``), whether the end
    is ``epochs`` or an earlier one that ``epoch_budget_minutes`` projects on a slower machine. A
    cap only lowers a rate, so a schedule already below it is untouched; each capped epoch is logged."""
    low_res_epochs: int = 0
    """Progressive resizing (0 = off): the first ``low_res_epochs`` epochs train on their batches
    scaled down to ``low_res_size`` px (bilinear, antialiased, after augmentation and the intensity
    rule), the later ones at ``img_size``. Validation, checkpoints and every step after training
    stay at ``img_size`` (the positional encoding is interpolated to the smaller token grid). A
    training step at 96 px cost 0.60 of one at 128 px on the AVX2-only CPU measured (bench/speed.py),
    so more epochs fit a time budget."""
    low_res_size: int = 96
    """The input side of the low-size epochs (``low_res_epochs``, ``low_res_budget``): a multiple
    of 32 below ``img_size``."""
    low_res_budget: bool = False
    """Progressive resizing only where ``epoch_budget_minutes`` binds: where the epochs left would not
    all fit the budget at ``img_size``, the epochs right after the first train at ``low_res_size``,
    as few as make all ``epochs`` fit (re-planned after every epoch from the measured epoch times;
    the last 3 always at ``img_size``). Inert where every epoch fits; the epochs trained small are
    listed in ``summary.json`` (``time_budget.low_res_epochs``). Not with ``low_res_epochs``."""
    label_smoothing: float = 0.0
    """Label smoothing of the training targets (0 = off, hard labels)."""
    mixup_alpha: float = 0.0
    """Mixup (Zhang et al., 2018): each training batch becomes ``lam * x + (1 - lam) * x[perm]``
    with one ``lam ~ Beta(alpha, alpha)`` per batch and a random pairing ``perm``; the loss is the
    same mixture of the two labels' losses. 0 = off. It mixes what the model is fed: the images,
    or the cached feature maps when ``cache_features`` is on. Training only."""

    # --- backbone ----------------------------------------------------------------------------
    freeze_cnn: bool = False
    """Freeze the whole DenseNet121 backbone (BatchNorm statistics included)."""
    fine_tune_layers: int = 0
    """With freeze_cnn: leave the last k DenseNet stages trainable (1 = denseblock4 + norm5,
    2 adds transition3 + denseblock3, ..., 5 = everything)."""
    backbone_weights: Literal["file", "imagenet", "none"] = "file"
    """'file': load ``pretrained_path`` (CheXNet, torchvision or chexformer format), warn if it
    is missing; 'imagenet': torchvision's ImageNet weights (needs internet once); 'none'."""
    pretrained_path: str = "pretrained/model.pth.tar"
    """Backbone weights file read when backbone_weights is 'file'."""
    trust_checkpoint: bool = False
    """Allow full unpickling of ``pretrained_path`` (only for files from a source you trust)."""

    # --- data --------------------------------------------------------------------------------
    data_dir: str = "data"
    """Data set root with ``train/`` and ``test/`` (optionally ``val/``), one sub-folder per class."""
    out_dir: str = "runs/chexformer"
    """Run folder: checkpoints, logs, resolved config.yaml, results and report."""
    patient_regex: str = DEFAULT_PATIENT_REGEX
    """Regular expression whose first non-empty group (or whole match) is the patient id."""
    keep_aspect: bool = False
    """Resize keeping the aspect ratio and pad to a square, instead of stretching."""
    augment: bool = True
    """Random affine and brightness/contrast jitter on training images (never flips)."""
    rotation_deg: float = 7.0
    """Largest random rotation in degrees (augmentation)."""
    pad_fill: Literal["black", "random"] = "black"
    """What the random affine fills the area it uncovers with (rotated corners, a zoomed-out frame):
    ``black``, or ``random``, one grey level drawn uniformly from 0-255 for each image, so a uniform
    region of any level, black included, says nothing about the class."""
    translate: float = 0.06
    """Largest random shift as a fraction of the image side (augmentation)."""
    scale_min: float = 0.9
    """Smallest random zoom factor (augmentation)."""
    scale_max: float = 1.1
    """Largest random zoom factor (augmentation)."""
    brightness: float = 0.15
    """Brightness jitter strength (augmentation)."""
    contrast: float = 0.15
    """Contrast jitter strength (augmentation)."""
    acquisition_aug: float = 0.0
    """Probability of each random acquisition change in training (resolution loss, blur, gamma,
    noise, JPEG; see chexformer.shifts); 0 turns them off."""
    acquisition_strength: float = 1.0
    """Largest strength of those changes, as a multiple of the robustness suite's moderate severity."""
    sharpness_match: float = 0.0
    """Probability of blurring a training image of a class that is sharper than the bluntest class
    by the sigma that matches their median sharpness (measured on the training images at setup;
    chexformer.shifts.SharpnessMatch), so sharpness stops telling the classes apart; 0 turns it off.
    The per-class sharpness is measured and logged either way."""
    random_erasing: float = 0.0
    """Probability of erasing one random rectangle (2-33 % of the image, aspect 0.3-3.3) of a training
    image to the normalisation mean, 0 in every channel after ``Normalize`` (torchvision
    ``RandomErasing``, Zhong et al. 2020), so no single region, such as a corner marker, decides the
    class; 0 turns it off."""
    region_blur: float = 0.0
    """Probability of blurring one region of a training image (a random rectangle of 2-33 % of it, or
    a band: ``region_blur_where``) with a Gaussian of sigma 8-32 px at 224 px
    (chexformer.shifts.RandomRegionBlur), so a region with less coarse structure, which reads as
    pneumonia in the Kermany training images, carries no class; 0 turns it off."""
    region_blur_where: Literal["anywhere", "top_bottom_centre"] = "anywhere"
    """Where ``region_blur`` blurs: ``anywhere`` (a rectangle of 2-33 % of the image, as random erasing
    draws one) or ``top_bottom_centre`` (a band 8-25 % of the height deep across the middle half of the
    width, at the top or the bottom: mostly the neck and upper mediastinum or the upper abdomen, a fixed
    region, not a lung mask; ``configs/kermany.yaml``'s choice, with ``region_blur: 0.5``)."""
    edge_occlusion: float = 0.0
    """Probability of hiding a band along each edge of a training image (each edge's width drawn up to
    ``edge_occlusion_max`` of the side) with the image's mean grey level, so markers, collimation
    edges and what lies outside the lungs cannot decide the class; 0 turns it off."""
    edge_occlusion_max: float = 0.2
    """Largest band width per edge, as a fraction of the side."""
    consistency: float = 0.0
    """Weight of a consistency loss between two independently augmented views of each training image:
    the Jensen-Shannon divergence of their predicted class distributions (AugMix, Hendrycks et al.
    2020), so the prediction itself, not only the label, must not change with the acquisition
    changes and the geometry drawn. Each training batch then holds ``batch_size // 2`` images in two
    views (the same step cost), so an epoch costs about twice as much: halve ``epochs`` for the same
    compute. 0 turns it off. Needs ``augment``; not with mixup nor the cached maps of a frozen backbone."""
    intensity: Literal["stretch", "equalize"] = "stretch"
    """After the intensity rule (percentiles -> 0..255), 'stretch' keeps it; 'equalize' adds global
    histogram equalisation (invariant to any monotone contrast curve)."""
    ema_decay: float = 0.0
    """Exponential moving average of the weights (e.g. 0.999), validated and saved instead of the
    raw weights; 0 turns it off."""
    swa_epochs: int = 0
    """Stochastic weight averaging in its dense form (Izmailov et al., 2018; SWAD, Cha et al., 2021,
    for domain generalisation): the uniform average of the weights (and BatchNorm buffers) after
    every optimiser step of the last ``swa_epochs`` epochs of the ``epochs`` budget is validated and
    saved instead of the raw weights, which are validated and saved until then. 0 turns it off.
    Needs a fixed budget (``checkpoint_selection: last``, ``max_minutes: 0``) and ``ema_decay: 0``."""
    class_weighting: Literal["pos_weight", "sampler", "none"] = "pos_weight"
    """'pos_weight' (loss weights from training counts), 'sampler' (balanced sampling), 'none'."""
    strict: bool = False
    """Treat unreadable images as an error instead of skipping and reporting them."""
    num_workers: int = 2
    """DataLoader worker processes (0 = load in the main process)."""
    preload: Literal["auto", "on", "off"] = "auto"
    """Decode and resize every image once and keep the uint8 tensors in memory: 'auto' (when
    the dataset fits in ``preload_max_gb``), 'on', 'off'."""
    preload_max_gb: float = 4.0
    """Memory limit for preload 'auto', in GiB of decoded uint8 images."""

    # --- fast frozen path --------------------------------------------------------------------
    cache_features: Literal["auto", "memory", "disk", "off"] = "auto"
    """Backbone feature cache when the backbone is fully frozen: 'auto' (memory), 'memory',
    'disk', 'off'."""
    cache_views: int = 4
    """Augmented views cached per training image (1 = no augmentation)."""
    cache_dir: str = ""
    """Where the disk cache lives; default ``OUT_DIR/feature_cache``."""

    # --- evaluation ----------------------------------------------------------------------------
    threshold_method: Literal["shift_robust", "shift_worst", "youden", "sensitivity"] = "shift_robust"
    """How the operating threshold stored in best.ckpt is chosen on validation after training:
    'shift_robust' (maximal Youden J averaged over validation clean and under the 24 shifts of the
    robustness suite), 'shift_worst' (maximal smallest J over those copies: a minimax cut, higher
    specificity under the worst shift for some sensitivity; bench/threshold_rules.py), 'youden' (clean
    validation only) or 'sensitivity' (target_sensitivity)."""
    target_sensitivity: float = 0.95
    """Sensitivity the 'sensitivity' threshold method aims for on validation."""

    # --- runtime -----------------------------------------------------------------------------
    seed: int = 42
    """Seed for the patient split (unless split_seed is set), weight initialisation, augmentation
    and data order."""
    split_seed: int = -1
    """Seed for the patient-grouped validation split alone; -1 (default) uses ``seed``. Set it to
    train several seeds on one validation split: to tell initialisation noise from split noise, or
    to ensemble independent models (bench/ensemble_probs.py)."""
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    """Lightning accelerator; 'auto' picks CUDA when available, else the CPU."""
    devices: str = "auto"
    """Lightning devices: 'auto', a count ('2') or a comma-separated list of indices ('0,1')."""
    num_nodes: int = 1
    """Machines taking part in distributed training."""
    strategy: Literal["auto", "ddp"] = "auto"
    """Lightning strategy: 'auto' (several devices: DDP) or 'ddp' (one process per device, started by
    Lightning, torchrun or srun). Not offered: 'ddp_spawn' / 'ddp_fork' / 'ddp_notebook' train in
    child processes and hand back only the weights, so the saved run would lose its threshold,
    calibration and validation predictions; FSDP and DeepSpeed shard a model this size does not
    need sharded and are untested here."""
    precision: Literal["auto", "32", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"
    """'auto' (bf16-mixed where the CPU or GPU computes bf16 natively; 16-mixed on a GPU without it,
    e.g. V100 or T4; else 32), '32', 'bf16-mixed', '16-mixed', 'bf16-true'."""
    channels_last: bool = True
    """Channels-last memory format for the backbone (faster convolutions on most hardware)."""
    compile: bool = False
    """torch.compile the backbone and encoder layers (slow first steps, faster later ones)."""
    log_images_every: int = 5
    """Write feature and attention maps to TensorBoard every this many epochs (0 = never)."""
    logger: Literal["tensorboard", "csv", "mlflow"] = "tensorboard"
    """Where metrics and hyperparameters go: 'tensorboard' (OUT/tensorboard), 'csv' (OUT/csv/metrics.csv)
    or 'mlflow' (a local OUT/mlruns store, no server; needs pip install mlflow). history.csv is
    written in every case."""

    @property
    def effective_split_seed(self) -> int:
        """The seed the patient split is drawn with."""
        return self.seed if self.split_seed < 0 else self.split_seed

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`ConfigError` listing every problem at once."""
        problems = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                problems.append(msg)

        need(self.img_size >= 32 and self.img_size % 32 == 0,
             f"img_size must be a positive multiple of 32 (DenseNet121 downsamples by 32), got {self.img_size}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(0.0 < self.validation_split < 1.0,
             f"validation_split must lie strictly between 0 and 1, got {self.validation_split}")
        need(self.d_model >= 1, f"d_model must be >= 1, got {self.d_model}")
        need(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
        if self.d_model >= 1 and self.num_heads >= 1:
            need(self.d_model % self.num_heads == 0,
                 f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        need(self.ffn_dim >= 1, f"ffn_dim must be >= 1, got {self.ffn_dim}")
        need(self.num_layers >= 0, f"num_layers must be >= 0, got {self.num_layers}")
        need(0.0 <= self.dropout_rate < 1.0, f"dropout_rate must lie in [0, 1), got {self.dropout_rate}")
        need(0.0 <= self.attn_dropout < 1.0, f"attn_dropout must lie in [0, 1), got {self.attn_dropout}")
        for name in ("init_lr", "min_lr", "weight_decay", "backbone_lr_scale"):
            need(getattr(self, name) >= 0, f"{name} must not be negative, got {getattr(self, name)}")
        need(self.init_lr > 0, f"init_lr must be positive, got {self.init_lr}")
        need(self.min_lr <= self.init_lr, f"min_lr ({self.min_lr}) must not exceed init_lr ({self.init_lr})")
        need(0.0 < self.lr_factor < 1.0, f"lr_factor must lie in (0, 1), got {self.lr_factor}")
        need(0.0 <= self.label_smoothing < 0.5, f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        need(self.mixup_alpha >= 0, f"mixup_alpha must not be negative, got {self.mixup_alpha}")
        need(self.max_minutes >= 0, f"max_minutes must not be negative, got {self.max_minutes}")
        need(self.epoch_budget_minutes >= 0,
             f"epoch_budget_minutes must not be negative, got {self.epoch_budget_minutes}")
        need(self.epoch_budget_reserve >= 0,
             f"epoch_budget_reserve must not be negative, got {self.epoch_budget_reserve}")
        need(self.swa_epochs == 0 or self.epoch_budget_minutes == 0,
             "swa_epochs averages the last epochs of the budget: set epoch_budget_minutes to 0 (a time budget "
             "could end training before the average starts)")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        need(self.lr_patience >= 0, f"lr_patience must be >= 0, got {self.lr_patience}")
        need(self.final_anneal_epochs >= 0, f"final_anneal_epochs must not be negative, got {self.final_anneal_epochs}")
        need(0 <= self.low_res_epochs < max(1, self.epochs),
             f"low_res_epochs must lie in [0, epochs) (the last epochs train at img_size), got {self.low_res_epochs}")
        if self.low_res_epochs > 0 or self.low_res_budget:
            need(32 <= self.low_res_size < self.img_size and self.low_res_size % 32 == 0,
                 f"low_res_size must be a multiple of 32 below img_size ({self.img_size}), got {self.low_res_size}")
        if self.low_res_budget:
            need(self.epoch_budget_minutes > 0, "low_res_budget plans low-size epochs for the epoch budget: set "
                 "epoch_budget_minutes, or low_res_epochs for a fixed number")
            need(self.low_res_epochs == 0, "low_res_budget plans the low-size epochs itself: set low_res_epochs to 0")
        need(0 <= self.fine_tune_layers <= 5,
             f"fine_tune_layers must lie in 0..5 (DenseNet121 stages), got {self.fine_tune_layers}")
        need(not (self.fine_tune_layers > 0 and not self.freeze_cnn),
             f"fine_tune_layers={self.fine_tune_layers} only applies with freeze_cnn=true "
             "(with freeze_cnn=false the whole backbone already trains)")
        for name, allowed in field_choices().items():  # the Literal fields
            value = getattr(self, name)
            need(value in allowed, f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        need(self.cache_views >= 1, f"cache_views must be >= 1, got {self.cache_views}")
        need(0.0 < self.target_sensitivity <= 1.0,
             f"target_sensitivity must lie in (0, 1], got {self.target_sensitivity}")
        need(0 <= self.seed < 2**32, f"seed must lie in 0..2**32-1 (NumPy's range), got {self.seed}")
        need(self.split_seed >= -1, f"split_seed must be >= 0, or -1 to use seed, got {self.split_seed}")
        need(self.devices == "auto" or _DEVICES.fullmatch(str(self.devices).strip()) is not None,
             f"devices must be 'auto', a count ('2', -1 for all) or a comma-separated list of indices ('0,1'), "
             f"got {self.devices!r}")
        for f in fields(self):  # +-inf would pass one-sided range checks such as init_lr > 0
            value = getattr(self, f.name)
            if isinstance(value, float):
                need(math.isfinite(value), f"{f.name} must be a finite number, got {value}")
        need(self.num_workers >= 0, f"num_workers must be >= 0, got {self.num_workers}")
        need(self.num_nodes >= 1, f"num_nodes must be >= 1, got {self.num_nodes}")
        need(0.0 <= self.rotation_deg <= 30.0, f"rotation_deg must lie in [0, 30], got {self.rotation_deg}")
        need(0.0 <= self.translate <= 0.3, f"translate must lie in [0, 0.3], got {self.translate}")
        need(0.5 <= self.scale_min <= self.scale_max <= 1.5,
             f"need 0.5 <= scale_min <= scale_max <= 1.5, got {self.scale_min}, {self.scale_max}")
        need(0.0 <= self.brightness < 1.0 and 0.0 <= self.contrast < 1.0,
             "brightness and contrast jitter must lie in [0, 1)")
        need(0.0 <= self.acquisition_aug <= 1.0, f"acquisition_aug must lie in [0, 1], got {self.acquisition_aug}")
        need(0.0 <= self.random_erasing <= 1.0, f"random_erasing must lie in [0, 1], got {self.random_erasing}")
        need(0.0 <= self.region_blur <= 1.0, f"region_blur must lie in [0, 1], got {self.region_blur}")
        need(0.0 <= self.edge_occlusion <= 1.0, f"edge_occlusion must lie in [0, 1], got {self.edge_occlusion}")
        need(self.consistency >= 0, f"consistency must not be negative, got {self.consistency}")
        if self.consistency > 0:
            need(self.augment, "consistency compares two augmented views of each image: set augment to true")
            need(self.batch_size >= 2, f"consistency trains batch_size // 2 images in two views: batch_size must be "
                 f">= 2, got {self.batch_size}")
            need(self.mixup_alpha == 0, "consistency and mixup do not combine: set one of them to 0")
        need(0.0 < self.edge_occlusion_max < 0.5,
             f"edge_occlusion_max must lie in (0, 0.5), got {self.edge_occlusion_max}")
        need(0.0 <= self.sharpness_match <= 1.0, f"sharpness_match must lie in [0, 1], got {self.sharpness_match}")
        need(0.0 < self.acquisition_strength <= 2.0,
             f"acquisition_strength must lie in (0, 2], got {self.acquisition_strength}")
        need(self.ema_decay == 0.0 or 0.5 <= self.ema_decay < 1.0,
             f"ema_decay must be 0 (off) or lie in [0.5, 1), got {self.ema_decay}")
        need(0 <= self.swa_epochs <= self.epochs,
             f"swa_epochs must lie in 0..epochs ({self.epochs}), got {self.swa_epochs}")
        need(self.swa_epochs == 0 or self.ema_decay == 0.0,
             "swa_epochs and ema_decay are two ways to average the weights; set one of them to 0")
        need(self.swa_epochs == 0 or (self.checkpoint_selection == "last" and self.max_minutes == 0),
             "swa_epochs averages the last epochs of a fixed budget: it needs checkpoint_selection: last "
             "and max_minutes: 0 (early stopping or a time limit could end training before the average starts)")
        try:
            import re

            re.compile(self.patient_regex)
        except re.error as exc:
            problems.append(f"patient_regex is not a valid regular expression: {exc}")
        if problems:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Config:
        """Build and validate a config; unknown keys and wrongly typed values are errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of field names to values, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        problems = []
        kwargs = {}
        for key, value in data.items():
            name = str(key).replace("-", "_").lower()
            if name not in known:
                close = _close_matches(name, known)
                problems.append(f"unknown key {key!r}" + (f" (did you mean {close}?)" if close else ""))
                continue
            try:
                kwargs[name] = _coerce(value, _field_type(cls, name), name)
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError(f"{source}:\n  - " + "\n  - ".join(problems))
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def replace(self, **changes: Any) -> Config:
        """A validated copy with some fields changed."""
        return Config.from_dict({**self.to_dict(), **changes})

    def to_yaml(self) -> str:
        """The config as YAML, fields in declaration order (what :meth:`save` writes)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml())


@functools.cache
def _type_hints() -> dict[str, Any]:
    """Config's field types, resolved once (``from __future__ import annotations`` leaves strings)."""
    return typing.get_type_hints(Config)


def _field_type(cls: type, name: str) -> Any:
    return _type_hints()[name] if cls is Config else typing.get_type_hints(cls)[name]


def field_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each enumeration (``Literal[...]``) field, by field name."""
    return {name: typing.get_args(typ) for name, typ in _type_hints().items() if typing.get_origin(typ) is Literal}


@functools.cache
def _field_docs() -> dict[str, str]:
    try:
        tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    except (OSError, SyntaxError):  # no source shipped: options keep their default and choices only
        return {}
    body = next(node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Config")
    docs = {}
    for stmt, after in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[stmt.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


def field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it in :class:`Config`), on one line.

    Read from this module's source with ``ast`` once per process; ``--help`` shows them.
    """
    return dict(_field_docs())


def _close_matches(name: str, known) -> str:
    return ", ".join(difflib.get_close_matches(name, list(known), n=2))


_DEVICES = re.compile(r"-?\d+|\d+(\s*,\s*\d+)*\s*,?")
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _coerce(value: Any, typ: type, name: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to ``typ`` or raise ConfigError."""
    if typing.get_origin(typ) is Literal:
        allowed = typing.get_args(typ)
        # YAML reads `precision: 32` as an int; the allowed values are strings.
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
        if text in allowed:
            return text
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}{hint}")
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if value is None or isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{name}: expected {typ.__name__}, got {value!r}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, but a key given twice in one mapping is an error, not the last one silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then ``overrides``; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of field names to values")
        # Validate the file's own keys first so the message names the file.
        Config.from_dict(loaded, source=str(path))
        data.update(loaded)
    data.update(overrides or {})
    return Config.from_dict(data, source=str(path) if path else "config")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` and one ``--field-name VALUE`` option per config field.

    Each option's help is the field's docstring and its default; an enumeration shows its
    allowed values as the metavar. The values stay strings here: :func:`load_config` coerces and
    validates them with the YAML file's rules, so both report errors the same way.
    """
    parser.add_argument("--config", metavar="FILE", help="YAML file with config fields")
    group = parser.add_argument_group("config fields (override the YAML file)")
    hints, docs, choices = _type_hints(), _field_docs(), field_choices()
    for f in fields(Config):
        if f.name in choices:
            metavar = "{" + ",".join(choices[f.name]) + "}"
        else:
            metavar = {bool: "BOOL", int: "INT", float: "FLOAT"}.get(hints[f.name], "STR")
        text = f"{docs.get(f.name, '')} (default: {_show(f.default)})".strip()
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f"cfg__{f.name}",
            metavar=metavar,
            default=None,
            help=text.replace("%", "%%"),  # argparse %-formats help strings
        )


def _show(value: Any) -> str:
    """A default as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else "''"


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given explicitly on the command line (as strings, not yet coerced)."""
    return {k[5:]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), overrides_from_args(args))

