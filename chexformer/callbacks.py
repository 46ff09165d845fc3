"""Lightning callbacks of a training run: history.csv, averaged weights (EMA or dense SWA), what
``--resume`` needs beyond Lightning's checkpoint (the random generators, the saved epoch's scheduler
step), and the DDP agreement check.

In: the trainer's logged metrics and the module's epoch averages after every epoch; the weights of
every rank at the end of training. Out: ``OUT/history.csv`` (one row per epoch), averaged weights
(exponential or uniform) that Lightning validates and checkpoints, the resume state in every
checkpoint, and ``OUT/ddp_check.json`` under DDP.
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
from torch.optim.swa_utils import get_ema_multi_avg_fn, get_swa_avg_fn

from chexformer.history import read_history, write_history

log = logging.getLogger(__name__)

__all__ = ["EMA", "SWA", "EpochBudget", "FinalAnneal", "HistoryCSV", "RankAgreement", "ResumeState"]


class HistoryCSV(Checkpoint):
    """``history.csv``: one row of metrics per epoch, rewritten atomically after each epoch.

    The train columns are the module's own averages over this epoch's batches
    (:attr:`ChexFormerModule.epoch_train_metrics`), the val columns this epoch's validation.
    Subclassing :class:`Checkpoint` makes Lightning call this after the module's
    ``on_train_epoch_end`` (as for ModelCheckpoint), so every row belongs to one epoch; listed
    before the ModelCheckpoints, it writes an epoch's row before its checkpoints, so no checkpoint
    is ever ahead of the history (a resume rewrites any row past its checkpoint's epoch).
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


class SWA(WeightAveraging):
    """Uniform average of every parameter and buffer after each optimiser step from epoch
    ``start_epoch`` on (dense SWA, as in SWAD). Until the first update there is no average: the raw
    weights are validated and checkpointed (Lightning's base class would swap in the copy of the
    initial weights that :class:`AveragedModel` starts from).

    The update is torch's per-tensor SWA function on every device: without one, AveragedModel
    takes its foreach branch where foreach kernels exist (CUDA), and that branch raises on
    BatchNorm's integer step counter (torch 2.11 on an H200). On the CPU this is the update torch
    ran anyway, so CPU runs are unchanged to the bit."""

    def __init__(self, start_epoch: int) -> None:
        super().__init__(use_buffers=True, avg_fn=get_swa_avg_fn())
        self.start_epoch = start_epoch
        self._trainer = None
        self._restored_start: int | None = None  # the start epoch of a checkpoint's average

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and self._trainer.current_epoch >= self.start_epoch

    def state_dict(self) -> dict:
        return {**super().state_dict(), "start_epoch": self.start_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._restored_start = state_dict.get("start_epoch")

    def on_train_start(self, trainer, pl_module) -> None:
        if self._averaging() and self._restored_start not in (None, self.start_epoch):
            log.warning("--resume: the checkpoint's weight average began at epoch %d, this run's epochs and "
                        "swa_epochs start it at %d; the average keeps the steps since epoch %d (a changed budget "
                        "moves the averaged stretch)", self._restored_start, self.start_epoch, self._restored_start)

    def _averaging(self) -> bool:
        return self._average_model is not None and int(self._average_model.n_averaged) > 0

    def _swap_models(self, pl_module) -> None:  # validation: the average once it exists
        if self._averaging():
            super()._swap_models(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._averaging():
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._average_model is None or self._averaging():
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
        else:  # the raw weights, in the layout the base class reads back on resume
            checkpoint["current_model_state"] = checkpoint["state_dict"]
            checkpoint["averaging_state"] = {"n_averaged": self._average_model.n_averaged.clone()}


class EpochBudget(Callback):
    """A wall-clock budget for a fixed number of epochs, kept in whole epochs: after each epoch
    (validation included), training stops if one more epoch, as long as the longest so far, would
    end more than ``minutes`` after training began in this process. On a slower machine the run
    trains fewer epochs instead of overrunning its time. Lightning's ``max_time`` stops in the
    middle of an epoch, and its Timer at epoch granularity only once the limit has passed (up to an
    epoch late). Every rank takes the same decision. ``stopped_after`` is the last epoch trained
    (0-based) when the budget ended the run, else None.

    ``reserve`` keeps that many more longest epochs of the budget free for what runs after training
    (the robustness suite, TTA and the guard in :func:`chexformer.train.train`): those steps are
    forward passes of the same model, so their time scales with the machine's speed as an epoch's
    does, and a budget in minutes then holds for the whole run on a slower machine too.

    Progressive resizing (``low_res_ratio``: what a low-size epoch costs against a full-size one
    until both are measured): epochs before the module's ``low_res_until`` train at the low size,
    and projections count them at their own length. The stop rule still assumes the next epoch and
    the reserve as long as the longest full-size epoch (projected from a low-size one until one is
    measured). With ``plan`` (``low_res_budget``) the budget first buys epochs instead of cutting
    them: where the epochs left would not all fit, the epochs right after the first train at the low
    size, as few as make every epoch fit, re-planned at each epoch's start from the longest epoch
    measured at each size. The last ``full_at_end`` epochs always train at full size; where even that
    does not fit, the block leaves room for them inside the budget, and the stop rule ends the run as
    before. Once an epoch after the first trains at full size, the rest do too. On a machine where
    every epoch fits at full size nothing changes. ``low_res_epochs`` lists the epochs trained at the
    low size; it is kept in checkpoints, so a resumed run continues the plan (with a new clock).

    The first epoch of a process is probed early (after a tenth of its training batches, at least 5
    or all where there are fewer): ``projected_epochs`` is the epoch the stop rule is projected to let
    the run reach at that pace (counted from 1, resumed epochs included), and where it is short of
    ``max_epochs`` a warning says so at once, not an epoch later, with what would train them all. The
    probe leaves out validation and the pauses between epochs (checkpoints), which make the count
    come out high, and includes the first batches' warm-up, which makes it come out low: it is a
    forecast, the stop rule after each epoch decides. Not probed with progressive resizing (its own
    plan adapts the sizes)."""

    def __init__(self, minutes: float, reserve: float = 0.0, low_res_ratio: float | None = None,
                 plan: bool = False, full_at_end: int = 3) -> None:
        if plan and low_res_ratio is None:
            raise ValueError("a low-size plan needs low_res_ratio")
        self.seconds = 60.0 * minutes
        self.reserve = float(reserve)
        self.low_res_ratio = low_res_ratio
        self.plan = plan
        self.full_at_end = int(full_at_end)
        self.stopped_after: int | None = None
        self.low_res_epochs: list[int] = []
        self._begin = self._epoch_begin = time.perf_counter()
        self._longest = 0.0
        self._longest_full = self._longest_low = 0.0  # per size, for the projections
        self._until = 0  # the module's low_res_until at this epoch's start: epochs before it train small
        self._gap, self._epoch_end = 0.0, None  # the longest pause between epochs (checkpoints, epoch-end hooks)
        self.projected_epochs: int | None = None  # the early probe's count (the first epoch's first batches)
        self._probed = low_res_ratio is not None  # progressive resizing is never probed: its plan adapts

    def on_train_start(self, trainer, pl_module) -> None:
        self._begin = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_begin = time.perf_counter()
        if self._epoch_end is not None:
            self._gap = max(self._gap, self._epoch_begin - self._epoch_end)
        epoch = trainer.current_epoch
        if self.plan:
            low = self._block_open(epoch) and self.low_res_needed(epoch, trainer.max_epochs) > 0
            if trainer.strategy.reduce_boolean_decision(low, all=False):  # any rank's need: all go low
                pl_module.low_res_until = epoch + 1
        self._until = getattr(pl_module, "low_res_until", 0)
        if epoch < self._until:
            self.low_res_epochs.append(epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._probed:
            return
        total = trainer.num_training_batches
        if not np.isfinite(total) or batch_idx + 1 < min(total, max(5, round(0.1 * total))):
            return
        self._probed = True
        length = (time.perf_counter() - self._epoch_begin) * total / (batch_idx + 1)
        left = trainer.max_epochs - trainer.current_epoch
        self.projected_epochs = trainer.current_epoch + self._runs(self._epoch_begin - self._begin, [length] * left)
        if self.projected_epochs < trainer.max_epochs and trainer.is_global_zero:
            log.warning(
                "epoch_budget_minutes=%g: at this machine's pace (an epoch projected at %.1f min from the first %d "
                "batches, validation not counted) the budget is projected to let about %d of the %d planned epochs "
                "train, and will end the run early (summary.json says so). A schedule measured with all %d does "
                "not carry over to fewer: to train them all, run without the budget (--epoch-budget-minutes 0, "
                "about %.0f min of training left), on a faster machine (a GPU, or a CPU with native bf16), or with a "
                "cheaper input (a smaller --img-size)", self.seconds / 60, length / 60, batch_idx + 1,
                self.projected_epochs, trainer.max_epochs, trainer.max_epochs, left * length / 60)

    def state_dict(self) -> dict:
        return {"low_res_epochs": list(self.low_res_epochs)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.low_res_epochs = [int(e) for e in state_dict.get("low_res_epochs", [])]

    def _block_open(self, epoch: int) -> bool:
        """The low-size block follows the first epoch without a break."""
        return epoch >= 1 and self.low_res_epochs == list(range(1, epoch))

    def _sizes(self) -> tuple[float, float]:
        """(full-size, low-size) epoch lengths for projections: the longest measured of each, the other
        from ``low_res_ratio`` where only one is; (longest, longest) without progressive resizing."""
        if self.low_res_ratio is None:
            return self._longest, self._longest
        full = self._longest_full or self._longest_low / self.low_res_ratio
        return full, self._longest_low or full * self.low_res_ratio

    def _runs(self, elapsed: float, lengths: list[float]) -> int:
        """How many of the epochs ``lengths`` (the first about to start) the stop rule lets run, with
        ``elapsed`` seconds of training behind: the rule is checked after each epoch with the longest
        so far, and the clock runs through the longest pause between epochs."""
        longest, t, runs = max(self._longest, self._sizes()[0]), elapsed, 0
        for i, length in enumerate(lengths):
            if i and self._past_budget(t, longest):
                break
            t += length + (self._gap if i else 0.0)
            longest, runs = max(longest, length), runs + 1
        return runs

    def low_res_needed(self, epoch: int, max_epochs: int) -> int:
        """How many epochs from ``epoch`` (about to start) the plan trains at the low size: the fewest
        that let every epoch left run; where none do, the most that still leave the last
        ``full_at_end`` full-size epochs inside the budget; 0 before a first epoch is measured."""
        remaining = max_epochs - epoch
        full, low = self._sizes()
        if full <= 0 or remaining <= 0:
            return 0
        elapsed = time.perf_counter() - self._begin
        cap = max(0, remaining - self.full_at_end)
        plans = [(k, self._runs(elapsed, [low] * k + [full] * (remaining - k))) for k in range(cap + 1)]
        for k, runs in plans:
            if runs == remaining:
                return k
        return max((k for k, runs in plans if runs >= k + min(self.full_at_end, remaining - k)), default=0)

    def epochs_left(self, epoch: int, max_epochs: int) -> int:
        """How many epochs from ``epoch`` (about to start, counted) the budget is projected to let
        run: the rule of :meth:`on_train_epoch_end` applied ahead with the longest epoch and the
        longest pause between epochs so far (the rule's clock runs through the pauses, its epoch
        length does not), low-size epochs at their own length (the module's fixed ones, or the
        plan's). Before any epoch has ended there is nothing to project from: ``max_epochs - epoch``."""
        planned = max_epochs - epoch
        if self._longest <= 0:
            return planned
        full, low = self._sizes()
        if self.plan:  # at least this epoch where it trains small, whatever this rank's own plan says now
            k = max(1, self.low_res_needed(epoch, max_epochs)) if epoch < self._until else 0
        else:
            k = max(0, self._until - epoch)
        k = min(k, planned)
        return max(1, self._runs(time.perf_counter() - self._begin, [low] * k + [full] * (planned - k)))

    def _past_budget(self, elapsed: float, longest: float | None = None) -> bool:
        """The stop rule: would one more epoch plus the reserve, each as long as the longest so far,
        end past the budget when ``elapsed`` seconds of training are behind?"""
        longest = max(self._longest, self._sizes()[0]) if longest is None else longest
        return elapsed + longest * (1.0 + self.reserve) > self.seconds

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        now = self._epoch_end = time.perf_counter()
        length = now - self._epoch_begin
        self._longest = max(self._longest, length)
        if trainer.current_epoch < self._until:
            self._longest_low = max(self._longest_low, length)
        else:
            self._longest_full = max(self._longest_full, length)
        more = trainer.current_epoch + 1 < trainer.max_epochs
        stop = more and self._past_budget(now - self._begin)
        if trainer.strategy.reduce_boolean_decision(stop, all=False):
            trainer.should_stop = True
            self.stopped_after = trainer.current_epoch
            log.warning(
                "epoch_budget_minutes=%g: stopping after epoch %d of %d (%.1f min trained, longest epoch %.1f min, "
                "%.1f min reserved for the steps after training): another epoch would end past the budget on this "
                "machine", self.seconds / 60, trainer.current_epoch + 1, trainer.max_epochs,
                (now - self._begin) / 60, self._longest / 60, self._longest * self.reserve / 60)


class FinalAnneal(Callback):
    """End a run annealed, whether ``epochs`` or the epoch budget ends it (not early stopping or
    ``max_minutes``, which give no notice): the last ``epochs`` epochs train at most at
    ``lr0 * factor**j`` (``j`` = 1 for the first of them, ..., ``epochs`` for the last; each
    parameter group's own starting rate ``lr0``, never below its floor), the rates a plateau
    schedule has reached by the end of a full run. The end is ``max_epochs``, or sooner where an
    :class:`EpochBudget` projects fewer epochs to fit on this machine: a run the budget shortens
    would otherwise stop at its highest rate, with weights (and their average) that have not
    settled. A cap only lowers a rate (a schedule already below it is left alone) and is applied
    before every step, so a per-step schedule cannot undo it; Li et al. (ICLR 2020, "Budgeted
    training") measured that a schedule which decays by the budget's end is what a short budget
    needs. ``starts`` and ``floors`` map parameter-group names to their starting rate and floor.

    With ``epochs`` 0 it caps nothing, and still says when a resumed checkpoint's epoch was
    annealed (the trainer always carries it, so a resume that turns the anneal off is covered)."""

    def __init__(self, epochs: int, factor: float, starts: dict[str, float], floors: dict[str, float],
                 budget: EpochBudget | None = None) -> None:
        self.epochs = int(epochs)
        self.factor = float(factor)
        self.starts, self.floors = dict(starts), dict(floors)
        self.budget = budget
        self._caps: dict[str, float] = {}
        # the last epoch started (epoch, epochs projected left, epochs max_epochs leaves, capped or
        # not), saved in checkpoints: a resume tells an end the budget forecast from the configured one
        self._last: dict[str, int] = {}
        self._resumed: dict[str, int] = {}

    def cap(self, name: str, level: int) -> float:
        """The highest rate of group ``name`` ``level`` steps into the anneal (repeated
        multiplication, the plateau schedule's own arithmetic, so its rates compare exactly)."""
        lr = self.starts[name]
        for _ in range(level):
            lr = max(lr * self.factor, self.floors[name])
        return lr

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch
        left = trainer.max_epochs - epoch
        if self.epochs and self.budget is not None:
            # the earliest end any rank forecasts (any rank's vote stops the run): one rate; gathered on
            # the module's device, as an NCCL process group gathers CUDA tensors only
            forecast = torch.tensor(self.budget.epochs_left(epoch, trainer.max_epochs), device=pl_module.device)
            left = int(trainer.strategy.all_gather(forecast).min())
        level = self.epochs - left + 1
        self._caps = {} if level < 1 else {name: self.cap(name, level) for name in self.starts}
        self._last = {"epoch": epoch, "left": left, "planned": trainer.max_epochs - epoch, "capped": int(level >= 1)}
        if self._caps:
            self._apply(trainer)
            log.info("final_anneal_epochs=%d: epoch %d is projected to be %d from the end; learning rate at most %s",
                     self.epochs, epoch + 1, left, ", ".join(f"{n} {c:.3g}" for n, c in self._caps.items()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._caps:
            self._apply(trainer)

    def state_dict(self) -> dict:
        return dict(self._last or self._resumed)  # a resume that trains no epoch keeps what it loaded

    def load_state_dict(self, state_dict: dict) -> None:
        self._resumed = {k: int(v) for k, v in state_dict.items()}

    def on_train_start(self, trainer, pl_module) -> None:
        """A resumed run whose saved epoch was annealed for an end the budget forecast (not the
        configured one) cannot retrace the run, and says so: the budget's clock does not carry over a
        resume, and the rates the anneal lowered are not re-derived (a plateau schedule continues
        from them)."""
        state = self._resumed
        if not (trainer.ckpt_path and state.get("capped") and trainer.is_global_zero):
            return
        epoch, left, planned = state["epoch"], state["left"], state["planned"]
        if left < planned:
            log.warning("resuming a run whose epoch %d trained under the final anneal for an end the epoch budget "
                        "forecast (epoch %d of %d): the budget's clock does not carry over a resume and the rates the "
                        "anneal lowered are not re-derived, so the continued run is not the run this config trains "
                        "uninterrupted", epoch + 1, epoch + left, epoch + planned)

    def _apply(self, trainer) -> None:
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                cap = self._caps.get(group.get("name"))
                if cap is not None and group["lr"] > cap:
                    group["lr"] = cap


def _from_every_rank(trainer, make) -> list | None:
    """``make()`` of every rank, in rank order (a collective: every rank must call it), or None
    (without calling ``make``) with one process."""
    if trainer.world_size < 2 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    gathered = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, make())
    return gathered


def _seed_generators(seed: int) -> None:
    """Seed torch (every device), NumPy and Python's generators, leaving Lightning's environment alone."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _generator_state() -> dict:
    """This process's random generators, as tensors and plain numbers only (NumPy's key array as a
    tensor): checkpoints are read with ``torch.load(weights_only=True)``, and Lightning's own
    rng-state helpers store NumPy arrays."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _set_generator_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ResumeState(Callback):
    """What a Lightning checkpoint lacks for ``--resume`` to retrace the uninterrupted run.

    1. **The random generators** (torch, NumPy, Python, and CUDA where used): data order,
       augmentation and dropout draw from them, and Lightning does not checkpoint them, so a
       continued epoch would draw from the state ``seed_everything`` left at start-up. The state at
       the end of the saved epoch is stored and put back as soon as the checkpoint is loaded,
       before the first training batch is drawn (Lightning's sanity check runs under ``isolate_rng``).
    2. **The saved epoch's learning-rate scheduler step**: Lightning writes an epoch's checkpoints
       (``on_validation_end`` / ``on_train_epoch_end``) *before* it steps epoch-interval schedulers,
       and does not replay that step on resume, so ReduceLROnPlateau would forget the saved epoch's
       validation loss and cut the rate one epoch late. The monitored values are stored, and a
       scheduler that is one step behind the epoch is stepped once in ``on_train_start``.

    Exact with ``num_workers: 0`` (the recipe): persistent loader workers keep generators of their
    own, which are not saved. A checkpoint written before this callback existed resumes with a
    warning.

    Under DDP, with ``seed``, rank k > 0 reseeds its generators with ``seed + k`` at setup (rank
    zero keeps ``seed``): every rank is seeded alike at start-up, and with ``num_workers: 0`` its
    augmentation and dropout draw in the main process, so without this each rank would draw the same
    crops, flips and masks for its different images. (Lightning's worker seeding does this for loader
    workers; the weights stay identical, as DDP starts every rank from rank zero's.) Checkpoints then
    keep every rank's generators (``ranks``), and each rank resumes from its own."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._trainer = None
        self._loaded = False
        self._metrics: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        # a node that cannot see the checkpoint would start afresh while the others resume, and the
        # ranks would then wait on each other's collectives: every rank stops here instead
        resuming = _from_every_rank(trainer, lambda: bool(trainer.ckpt_path))
        if resuming is not None and len(set(resuming)) > 1:
            raise RuntimeError(
                f"--resume: ranks {[r for r, x in enumerate(resuming) if x]} found the checkpoint to resume from "
                f"and ranks {[r for r, x in enumerate(resuming) if not x]} did not: put --out-dir on storage that "
                "every node sees")
        if self.seed is not None and trainer.world_size > 1 and trainer.global_rank > 0:
            _seed_generators(self.seed + trainer.global_rank)

    def state_dict(self) -> dict:
        state = _generator_state()
        state["scheduler_metrics"] = {}
        trainer = self._trainer
        if trainer is not None:
            metrics = trainer.callback_metrics
            for config in trainer.lr_scheduler_configs:
                if config.reduce_on_plateau and config.monitor in metrics:
                    state["scheduler_metrics"][config.monitor] = float(metrics[config.monitor])
            # every rank dumps each checkpoint (rank zero writes it): all of them take part in the gather
            ranks = _from_every_rank(trainer, _generator_state)
            if ranks is not None:
                state["ranks"] = ranks
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        ranks = state_dict.get("ranks")
        if ranks and len(ranks) == world:
            _set_generator_state(ranks[rank])
        elif rank == 0:  # the other ranks keep their own seeds
            _set_generator_state(state_dict)
            if world > 1 or ranks:
                log.warning("the checkpoint holds random generator states for %d process(es), this run has %d: "
                            "rank zero continues from the saved one%s, so the continued run does not retrace the "
                            "saved one exactly", len(ranks or [0]), world,
                            ", the other ranks from their own seeds" if world > 1 else "")
        self._metrics = dict(state_dict.get("scheduler_metrics", {}))
        self._loaded = True

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.ckpt_path:
            return
        if not self._loaded:
            log.warning("%s carries no random generator state (written by an older chexformer): the continued "
                        "run will not retrace an uninterrupted one exactly", trainer.ckpt_path)
            return
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            behind = getattr(scheduler, "last_epoch", None) == trainer.current_epoch - 1
            if config.interval != "epoch" or config.frequency != 1 or not behind:
                continue  # not behind (or not a torch scheduler): nothing to replay
            if not config.reduce_on_plateau:
                scheduler.step()
            elif config.monitor in self._metrics:
                scheduler.step(self._metrics[config.monitor])
            else:
                log.warning("%s holds no %s for the learning-rate scheduler's step of epoch %d; the continued run "
                            "skips that step", trainer.ckpt_path, config.monitor, trainer.current_epoch - 1)
                continue
            log.info("resume: replayed the learning-rate scheduler's step of epoch %d (written after the checkpoint)",
                     trainer.current_epoch - 1)


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
