"""The one inference path: checkpoint -> preprocess -> device/precision -> logits -> calibrated
probability -> label.

``predict``, ``evaluate``, ``explain``, the robustness suite, TTA, export parity checks and the
web service all go through :class:`Predictor`, so the same file gives the same probability
whichever command scores it:

1. **preprocess** (:meth:`Predictor.load`): :func:`chexformer.data.load_image` (the intensity rule,
   any format) -> :func:`~chexformer.data.resize_image` -> uint8 (3, S, S);
2. **model input** (:meth:`Predictor.to_input`): the evaluation transform of training (intensity
   rule on the model-size image, normalisation);
3. **logits** (:meth:`Predictor.logits`): on the chosen device, in the chosen precision and memory
   format, in batches;
4. **calibrated probability** (:meth:`Predictor.probabilities`): Platt scaling fitted on
   validation, ``sigmoid(z / T + b)`` (binary) or ``softmax(z / T)``;
5. **label** (:meth:`Predictor.label`): the threshold stored in the checkpoint (binary) or argmax.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from tqdm.auto import tqdm

from chexformer import data, metrics
from chexformer.checkpoint import CheckpointMeta, load_checkpoint
from chexformer.data.io import grey_image
from chexformer.guard import Guard, population_verdicts
from chexformer.runtime import autocast_dtype, resolve_precision
from chexformer.synthetic import synthetic_image

log = logging.getLogger(__name__)

__all__ = ["Prediction", "Predictor", "resolve_device", "tta_views"]

PARITY_TOLERANCE = 1e-3
"""The fast backend is used only where it matches eager fp32 within this, in probability."""

_TTA_SHIFT = 0.04
_TTA_ZOOM = 1.06


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a GPU is a clear error."""
    if device in ("auto", None, ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU on this machine; "
                         "use --device cpu (or auto)")
    return dev


def tta_views(img: torch.Tensor) -> list[torch.Tensor]:
    """Test-time views of a uint8 image (C, S, S), before normalisation: the image, shifts of 4 %
    left, right, up and down, and a 6 % zoom. Uncovered pixels are black (0), as the training
    affine pads them; no flips (a mirrored chest is anatomically wrong)."""
    shift = max(1, round(_TTA_SHIFT * img.shape[-1]))
    views = [img]
    for dx, dy in ((shift, 0), (-shift, 0), (0, shift), (0, -shift)):
        views.append(TF.affine(img, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], fill=0))
    views.append(TF.affine(img, angle=0.0, translate=[0, 0], scale=_TTA_ZOOM, shear=[0.0, 0.0], fill=0))
    return views


@dataclass
class Prediction:
    """One file's result; ``error`` is set (and the rest empty) when it could not be read."""

    path: str
    probabilities: list[float] = field(default_factory=list)
    label: str | None = None
    threshold: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Predictor:
    """A trained model ready to score images; build it with :meth:`from_checkpoint`."""

    def __init__(self, model: torch.nn.Module, meta: CheckpointMeta, *, device: str = "auto",
                 precision: str = "32", backend: str = "eager", batch_size: int = 32) -> None:
        self.meta = meta
        self.cfg = meta.config
        self.device = resolve_device(device)
        accel = "gpu" if self.device.type == "cuda" else "cpu"
        self.precision = resolve_precision(precision, accel)
        if self.precision == "bf16-true":  # a run trained in true bf16: the weights stay fp32 here, bf16 autocast
            self.precision = "bf16-mixed"
        self.channels_last = bool(self.cfg.channels_last)
        self.model = model.eval().to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.transform = data.build_transforms(self.cfg, train=False, mean=meta.mean, std=meta.std)
        self.binary = meta.num_outputs == 1
        self.guard = None
        if meta.extra.get("guard"):
            self.guard = Guard.from_dict(meta.extra["guard"])
        self.backend = "eager"
        self._compiled = None
        if backend not in ("eager", "jit", "auto"):
            raise ValueError(f"backend must be 'eager', 'jit' or 'auto', got {backend!r}")
        if backend == "jit" or (backend == "auto" and self.device.type == "cpu"):
            self._use_jit(batch_size, required=backend == "jit")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, device: str = "auto", precision: str = "32",
                        backend: str = "eager", batch_size: int = 32) -> Predictor:
        """Load a chexformer checkpoint (trained on any device) onto ``device``.

        ``backend``: 'eager' (PyTorch as trained), 'jit' (TorchScript trace + freeze with oneDNN
        fusion, the fastest CPU path), or 'auto' (jit on CPU when it matches eager fp32 within
        :data:`PARITY_TOLERANCE` in probability on a probe batch, else eager)."""
        model, meta = load_checkpoint(path, map_location="cpu")
        return cls(model, meta, device=device, precision=precision, backend=backend, batch_size=batch_size)

    # --- fast path --------------------------------------------------------------------------------
    def _use_jit(self, batch_size: int, required: bool) -> None:
        """Trace + freeze the model for batches of ``batch_size`` (smaller ones are padded), with the
        precision's autocast baked into the graph; keep it only if it matches eager fp32."""
        start = time.perf_counter()
        dtype = autocast_dtype(self.precision)
        example = torch.zeros(batch_size, 3, self.img_size, self.img_size, device=self.device)
        if self.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        prev_autocast = torch._C._jit_set_autocast_mode(False)
        try:
            with torch.no_grad(), torch.autocast(self.device.type, dtype=dtype or torch.float32,
                                                 enabled=dtype is not None):
                frozen = torch.jit.freeze(torch.jit.trace(self.model, example, check_trace=False))
                probe = self._probe_batch(batch_size)
                with _onednn_fusion():
                    frozen(probe)  # first calls optimise the graph
                    fast = frozen(probe).float()
        except Exception as exc:  # tracing is best effort: eager always works
            if required:
                raise
            log.info("jit backend unavailable (%s: %s); using eager", type(exc).__name__, exc)
            return
        finally:
            torch._C._jit_set_autocast_mode(prev_autocast)
        with torch.no_grad():
            ref = self.model(probe).float()
        gap = float(np.abs(self.probabilities(fast.cpu()) - self.probabilities(ref.cpu())).max())
        if gap > PARITY_TOLERANCE and not required:
            log.info("jit backend (%s) differs from eager fp32 by %.2g in probability (> %g); using eager",
                     self.precision, gap, PARITY_TOLERANCE)
            return
        self._compiled, self._compiled_batch, self.backend = frozen, batch_size, "jit"
        self.parity_gap = gap
        log.info("jit backend (trace + freeze, %s, batch %d): max |p - p_eager_fp32| = %.2g on a probe batch; "
                 "ready in %.1f s", self.precision, batch_size, gap, time.perf_counter() - start)

    def _probe_batch(self, n: int) -> torch.Tensor:
        rng = np.random.default_rng(0)
        imgs = [self.load_array(synthetic_image(rng, self.img_size, opacity=bool(i % 2))[0]) for i in range(n)]
        x = self.to_input(imgs).to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # --- the steps ------------------------------------------------------------------------------
    @property
    def img_size(self) -> int:
        return self.cfg.img_size

    def load(self, path: str | os.PathLike) -> torch.Tensor:
        """Step 1: any image file -> uint8 (3, S, S). Raises :class:`~chexformer.data.ImageReadError`."""
        img = data.load_image(path, size_hint=self.img_size)
        return data.resize_image(img, self.img_size, self.cfg.keep_aspect)

    def load_array(self, grey: np.ndarray) -> torch.Tensor:
        """Step 1 for pixels already in memory (2-D grey or H x W x 3), any dtype."""
        return data.resize_image(grey_image(grey), self.img_size, self.cfg.keep_aspect)

    def to_input(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Step 2: uint8 images (B, 3, S, S) or a list of (3, S, S) -> normalised float batch."""
        return torch.stack([self.transform(img) for img in images])

    @torch.no_grad()
    def logits(self, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Step 3: normalised batch -> float32 logits on the CPU, (B, 1) or (B, C)."""
        dtype = autocast_dtype(self.precision)
        out = []
        if self._compiled is not None:
            batch_size = self._compiled_batch
        for chunk in x.split(batch_size):
            chunk = chunk.to(self.device, non_blocking=True)
            if self.channels_last:
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            if self._compiled is not None:
                n = len(chunk)
                if n < batch_size:  # the traced graph has a fixed batch: pad, then drop the padding
                    pad = chunk.new_zeros((batch_size - n, *chunk.shape[1:]))
                    chunk = torch.cat([chunk, pad]).contiguous(memory_format=torch.channels_last)
                with _onednn_fusion():
                    out.append(self._compiled(chunk)[:n].float().cpu())
                continue
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out.append(self.model(chunk).float().cpu())
        return torch.cat(out) if out else torch.empty(0, self.meta.num_outputs)

    def probabilities(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """Step 4: calibrated probabilities, (N,) P(positive class) or (N, C)."""
        lg = np.asarray(logits, dtype=np.float64)
        if self.binary:
            return metrics.apply_platt(lg.reshape(len(lg), -1)[:, 0], self.meta.temperature, self.meta.bias)
        return metrics.apply_temperature(lg, self.meta.temperature, multiclass=True)

    def calibrated_logits(self, logits: torch.Tensor | np.ndarray) -> np.ndarray:
        """Step 4 before the sigmoid, binary models: ``logit / temperature + bias``, (N,), float64;
        unlike a logit taken back from a probability, never clipped."""
        lg = np.asarray(logits, dtype=np.float64)
        return lg.reshape(len(lg), -1)[:, 0] / self.meta.temperature + self.meta.bias

    def threshold(self, tta: bool = False) -> float | None:
        """The stored decision threshold (binary); with ``tta`` the one chosen on validation
        predictions made with the same TTA views, when the checkpoint has it."""
        if not self.binary:
            return None
        if tta:
            stored = self.meta.extra.get("tta_threshold")
            if stored is None:
                log.warning("this checkpoint stores no threshold chosen with TTA; using the single-view "
                            "threshold %.4f (TTA may move probabilities slightly)", self.meta.threshold)
                return self.meta.threshold
            return float(stored)
        return self.meta.threshold

    def label(self, prob: np.ndarray, tta: bool = False) -> list[str]:
        """Step 5: class names at the stored threshold (binary) or by argmax."""
        names = self.meta.class_names
        if self.binary:
            t = self.threshold(tta)
            return [names[1] if p >= t else names[0] for p in np.atleast_1d(prob)]
        return [names[int(i)] for i in np.atleast_2d(prob).argmax(1)]

    # --- composed --------------------------------------------------------------------------------
    def predict_images(self, images: Sequence[torch.Tensor], tta: bool = False, batch_size: int = 64) -> np.ndarray:
        """uint8 images -> calibrated probabilities; with ``tta`` the logits of the views are averaged."""
        if not tta:
            return self.probabilities(self.image_logits(images, batch_size))
        views = [tta_views(img) for img in images]
        n_views = len(views[0])
        flat = self.image_logits([v for vs in views for v in vs], batch_size)
        return self.probabilities(flat.reshape(len(images), n_views, -1).mean(1))

    def predict_files(self, paths: Sequence[str | os.PathLike], *, batch_size: int = 32, tta: bool = False,
                      workers: int | None = None, progress: bool = False, guard: bool = True) -> list[Prediction]:
        """Score files in order; decoding of the next batch overlaps the model on this one.
        An unreadable file gives a :class:`Prediction` with ``error`` set. With a guard in the
        checkpoint (and ``guard``), ``extra`` holds ``ood_score`` and ``in_distribution``; an image
        whose pixels the model cannot be trusted on (:func:`chexformer.guard.pixel_problems`: blank, a few
        grey levels, a large uniform patch) gets ``in_distribution`` False and the reason in ``warning``, guard
        or not."""
        use_guard = guard and self.guard is not None
        paths = [Path(p) for p in paths]
        workers = workers or min(4, os.cpu_count() or 1)
        results: list[Prediction] = []
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for chunk, decoded in _prefetch(pool, self._load_or_error, paths, batch_size):
                ok = [i for i, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
                images = [decoded[i] for i in ok]
                probs = self.predict_images(images, tta=tta) if ok else np.empty(0)
                ood = self.ood_scores(images) if ok and use_guard else None
                verdicts, problems = population_verdicts(images, self.guard if use_guard else None, ood)
                for j, i in enumerate(ok):
                    decoded[i] = self._prediction(str(chunk[i]), probs[j], tta)
                    if ood is not None:
                        decoded[i].extra = {"ood_score": float(ood[j]), "in_distribution": verdicts[j]}
                    if problems[j] is not None:  # with or without a guard: out, whatever the score
                        decoded[i].extra.update(in_distribution=verdicts[j], warning=problems[j])
                for i, path in enumerate(chunk):
                    results.append(decoded[i] if isinstance(decoded[i], Prediction)
                                   else Prediction(str(path), error=str(decoded[i])))
                bar.update(len(chunk))
        bar.close()
        return results

    def ood_scores(self, images: Sequence[torch.Tensor]) -> np.ndarray | None:
        """The guard's out-of-population scores of uint8 images (None without a guard)."""
        return None if self.guard is None else self.guard.score(self, images)

    def _load_or_error(self, path: Path) -> torch.Tensor | str:
        try:
            return self.load(path)
        except data.ImageReadError as exc:
            return exc.reason

    def _prediction(self, path: str, prob: Any, tta: bool) -> Prediction:
        p = np.atleast_1d(np.asarray(prob, dtype=np.float64))
        if self.binary:
            probs = [1.0 - float(p[0]), float(p[0])]
        else:
            probs = [float(v) for v in p]
        label = self.label(p[0] if self.binary else p[None], tta)[0]
        return Prediction(path, probs, label, self.threshold(tta))

    # --- datasets --------------------------------------------------------------------------------
    def image_logits(self, images: Sequence[torch.Tensor], batch_size: int = 64) -> torch.Tensor:
        """Steps 2-3 for uint8 images (3, S, S), a batch at a time: logits (N, 1) or (N, C)."""
        out = [self.logits(self.to_input(images[i:i + batch_size]), batch_size)
               for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.meta.num_outputs)

    def dataset_logits(self, dataset: data.XrayDataset, batch_size: int = 64) -> torch.Tensor:
        """Logits for every item of an :class:`~chexformer.data.XrayDataset` (its uint8 images
        through this predictor's transform), in order."""
        return self.image_logits([dataset.uint8(i) for i in range(len(dataset))], batch_size)


class _onednn_fusion:
    """oneDNN graph fusion on for the duration (the frozen graph's fast CPU kernels)."""

    def __enter__(self) -> None:
        self.prev = torch._C._jit_llga_enabled()
        torch.jit.enable_onednn_fusion(True)

    def __exit__(self, *exc) -> None:
        torch.jit.enable_onednn_fusion(self.prev)


def _prefetch(pool: ThreadPoolExecutor, fn, items: list, batch_size: int) -> Iterator[tuple[list, list]]:
    """Yield ``(chunk, [fn(item) ...])`` batch by batch while the next batch is decoded."""
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    pending = [pool.submit(fn, it) for it in chunks[0]] if chunks else []
    for k, chunk in enumerate(chunks):
        done = [f.result() for f in pending]
        pending = [pool.submit(fn, it) for it in chunks[k + 1]] if k + 1 < len(chunks) else []
        yield chunk, done
