"""Speed benchmark: chexformer's fast paths against eager fp32, in one process, on the same inputs.

    python bench/speed.py [--img-size 224] [--batch-size 32] [--iters N] [--device cpu|cuda]
                          [--json OUT.json] [--quick] [--sections training ...] [--cpu-bf16]

Every ratio is measured against a baseline timed in the same process on the same model weights
and the same batch (seeded random normalised images), so the machine, thread count and torch
build cancel out. Sections:

1. inference (eval, no_grad): eager fp32 NCHW (baseline) vs channels_last, + bf16 autocast,
   + ``torch.compile`` (each mode, compile time reported apart) and, on CPU, ``torch.jit.trace`` +
   ``torch.jit.freeze`` with oneDNN fusion; the fastest is reported as "fastest".
2. training step (forward, BCE, backward, AdamW): eager fp32 NCHW vs channels_last + bf16
   (+ compile).
3. frozen backbone: an epoch over the same N images without the feature cache (backbone forward
   every epoch) vs with it (``chexformer.data.cache.compute_features`` once, then epochs of
   ``forward_from_features``); steady-state epoch times, the one-off build time, break-even.
4. transformer share: backbone alone vs transformer + head alone (fast path).
5. data loading: JPEG decode + resize, augmentation of preloaded uint8 tensors, against the
   training step rate: would loading be the bottleneck with and without preload?
6. bf16 accuracy cost: |logit| and |probability| differences fp32 vs bf16.
7. CUDA only: FLOPs per image (FlopCounterMode) and the fraction of the card's bf16 dense peak.

The report goes to stdout (it is the product of this script); progress and warnings go to the
log on stderr. Goals are printed, never asserted. ``--quick`` (64 px, batch 4, 2 iterations,
no compile) is for smoke tests only: its numbers mean nothing. ``--sections`` runs only the named
sections; ``--cpu-bf16`` measures bf16 autocast on a CPU that only emulates it (no AVX512-BF16 or
AMX), where ``precision: auto`` trains in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import math
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("bench.speed")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "kermany224" / "train"

GOALS = {"inference": 3.0, "training": 2.0, "cached_epoch": 20.0, "transformer_pct": 10.0}

# bf16 dense (no sparsity) peak in TFLOP/s, matched against torch.cuda.get_device_name() in order.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"H100.*PCIe", 756.0),
    (r"H100.*(SXM|HBM3)", 989.0),
    (r"H200", 989.0),
    (r"A100", 312.0),
    (r"\bL4\b", 121.0),
)

SECTIONS = ("inference", "training", "cached_epoch", "transformer_share", "data_loading", "accuracy")
QUICK = dict(img_size=64, batch_size=4, iters=2, warmup=1, epoch_images=64, cache_epochs=1, load_images=8)
FULL = dict(img_size=224, batch_size=32, iters=10, warmup=3, epoch_images=256, cache_epochs=2, load_images=128)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], iters: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` over ``iters`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _err(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def _f(v: float | None, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


def _release() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def gpu_peak_tflops(name: str) -> float | None:
    for pattern, peak in PEAK_BF16_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return peak
    return None


def environment(device: torch.device, fast_dtype: torch.dtype | None) -> dict[str, Any]:
    from chexformer.runtime import host_environment

    env: dict[str, Any] = {
        **host_environment(device),
        "device": str(device),
        "fast_dtype": str(fast_dtype).replace("torch.", "") if fast_dtype else "float32",
    }
    if "gpu" in env:
        env["gpu_peak_bf16_tflops"] = gpu_peak_tflops(env["gpu"])
    return env


# ----------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from chexformer.config import Config
        from chexformer.model import build_model
        from chexformer.runtime import cpu_supports_bf16

        self.args = args
        self.device = torch.device(args.device)
        if self.device.type == "cuda":
            self.fast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            # --cpu-bf16: bf16 autocast even where the CPU emulates it (to see what precision 'auto' avoids)
            self.fast_dtype = torch.bfloat16 if cpu_supports_bf16() or args.cpu_bf16 else None
        self.fast_name = "channels_last" + (f" + {str(self.fast_dtype)[6:]} autocast" if self.fast_dtype else " (fp32)")
        # Config defaults (d_model 256, 8 heads, ffn 512, 2 layers) unless the encoder size is given
        self.cfg = Config(img_size=args.img_size, batch_size=args.batch_size,
                          **{k: getattr(args, k) for k in ("d_model", "num_heads", "ffn_dim", "num_layers")
                             if getattr(args, k) is not None})
        self.results: dict[str, Any] = {}

        torch.manual_seed(0)
        self.model = build_model(self.cfg, num_classes=2).eval()
        if args.pretrained_path:
            from chexformer.weights import load_backbone_weights

            load_backbone_weights(self.model, args.pretrained_path)
        self.model.to(self.device)
        self.fast_model = copy.deepcopy(self.model).to(memory_format=torch.channels_last).eval()

        g = torch.Generator().manual_seed(1)
        B, S = args.batch_size, args.img_size
        self.x = torch.randn(B, 3, S, S, generator=g).to(self.device)  # normalised images
        self.y = torch.randint(0, 2, (B,), generator=g).float().to(self.device)
        self.flops: dict[str, float] = {}
        self.images_uint8: list[torch.Tensor] = []

    # --- one measured variant -------------------------------------------------------------------
    def _variant(self, name: str, make: Callable[[], Callable[[], torch.Tensor]], *, warmup: int | None = None,
                 ref: torch.Tensor | None = None, note: str = "") -> dict[str, Any]:
        """``make()`` builds the callable (compile/trace happens here or on its first call);
        setup_s = make() + the first call. Then ``warmup`` more untimed calls, ``iters`` timed."""
        a = self.args
        row: dict[str, Any] = {"name": name, "img_s": None, "median_s": None, "min_s": None, "setup_s": None,
                               "max_abs_logit_diff": None, "error": None, "note": note}
        log.info("timing: %s", name)
        try:
            t0 = time.perf_counter()
            fn = make()
            out = fn()
            _sync(self.device)
            row["setup_s"] = time.perf_counter() - t0
            times = _time(fn, a.iters, a.warmup if warmup is None else warmup, self.device)
        except Exception as exc:  # a failed compile/trace is a result to report, not a crash
            row["error"] = _err(exc)
            log.warning("%s failed: %s", name, row["error"])
            return row
        row["median_s"] = statistics.median(times)
        row["min_s"] = min(times)
        row["img_s"] = a.batch_size / row["median_s"]
        if ref is not None and out.dim() == ref.dim():
            row["max_abs_logit_diff"] = (out.detach().float() - ref).abs().max().item()
        return row

    # --- 1. inference -------------------------------------------------------------------------
    def inference(self) -> dict[str, Any]:
        a, dev, dt = self.args, self.device, self.fast_dtype
        base, fast, x = self.model, self.fast_model, self.x
        with torch.no_grad():
            ref = base(x).float()

        def eager(model, channels_last, dtype):
            def make():
                def run():
                    with torch.no_grad(), _autocast(dev, dtype):
                        return model(_cl(x) if channels_last else x)
                return run
            return make

        rows = [self._variant("eager fp32 NCHW (baseline)", eager(base, False, None), ref=ref)]
        rows.append(self._variant("channels_last fp32", eager(fast, True, None), ref=ref))
        if dt is not None:
            rows.append(self._variant(self.fast_name, eager(fast, True, dt), ref=ref))
        fast_row = rows[-1]

        compile_rows = []
        if a.compile_on:
            for mode in a.compile_modes:
                _release()
                model = copy.deepcopy(fast)

                def make(model=model, mode=mode):
                    compiled = self._compile(model, mode)

                    def run():
                        with torch.no_grad(), _autocast(dev, dt):
                            return compiled(_cl(x))
                    return run

                row = self._variant(f"{self.fast_name} + {self._compile_label(mode)}", make, ref=ref,
                                    note="setup_s = compile time (first call)")
                row["compile_mode"] = mode
                compile_rows.append(row)
                rows.append(row)
                del model
        jit_rows = []
        if a.jit_on and dev.type == "cpu":
            for dtype in ([None, dt] if dt is not None else [None]):
                _release()
                label = "fp32" if dtype is None else str(dtype)[6:]
                row = self._variant(f"jit trace+freeze, oneDNN fusion, channels_last {label}",
                                    lambda dtype=dtype: self._jit(fast, dtype), warmup=max(a.warmup, 3), ref=ref,
                                    note="setup_s = trace + freeze + first call")
                jit_rows.append(row)
                rows.append(row)
        _release()

        best_compile = max((r for r in compile_rows if r["img_s"]), key=lambda r: r["img_s"], default=None)
        notes = []
        if a.compile_on:
            if best_compile is None:
                notes.append("torch.compile failed in every mode ("
                             + "; ".join(f"{r['compile_mode']}: {r['error']}" for r in compile_rows)
                             + f"); the non-compiled fast path is {fast_row['name']}")
            elif fast_row["img_s"] and best_compile["img_s"] <= fast_row["img_s"]:
                notes.append(f"torch.compile did not pay off: slower than the non-compiled {fast_row['name']}")
        else:
            notes.append("torch.compile not measured" + (" (--quick)" if a.quick else " (--compile off)"))
        if dev.type == "cpu" and not a.jit_on:
            notes.append("torch.jit not measured (--jit off)")
        elif dev.type != "cpu":
            notes.append("torch.jit trace + freeze (oneDNN fusion) is a CPU path: not measured on " + dev.type)
        return self._report("inference", "1. Inference (eval, no_grad)", "forward", rows, fast_row, notes,
                            best_compile_mode=best_compile["compile_mode"] if best_compile else None)

    def _compile_label(self, mode: str) -> str:
        backend = self.args.compile_backend
        return f"compile({mode})" if backend == "inductor" else f"compile({mode}, backend={backend})"

    def _compile(self, model, mode: str):
        kw = {} if mode == "default" else {"mode": mode}
        return torch.compile(model, backend=self.args.compile_backend, **kw)

    def _jit(self, model, dtype):
        """TorchScript trace + freeze; with ``dtype`` the autocast casts are baked into the graph
        (JIT autocast off while tracing, as the oneDNN/IPEX recipe does)."""
        x = _cl(self.x)
        prev_llga = torch._C._jit_llga_enabled()
        torch.jit.enable_onednn_fusion(True)
        prev_autocast = torch._C._jit_set_autocast_mode(False) if dtype is not None else None
        try:
            with torch.no_grad(), _autocast(self.device, dtype):
                traced = torch.jit.trace(model, x, check_trace=False)
                frozen = torch.jit.freeze(traced)
        finally:
            if prev_autocast is not None:
                torch._C._jit_set_autocast_mode(prev_autocast)

        def run():
            torch.jit.enable_onednn_fusion(True)
            try:
                with torch.no_grad():
                    return frozen(_cl(self.x))
            finally:
                torch.jit.enable_onednn_fusion(prev_llga)
        return run

    # --- 2. training step ---------------------------------------------------------------------
    def _step(self, model, opt, x, y, dtype, from_features: bool = False) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with _autocast(self.device, dtype):
            logits = model.forward_from_features(x) if from_features else model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float().squeeze(1), y)
        loss.backward()
        opt.step()
        return loss.detach()

    def training(self) -> dict[str, Any]:
        a, dev, dt = self.args, self.device, self.fast_dtype
        x, y = self.x, self.y

        def variant(name, channels_last, dtype, compile_mode=None, note=""):
            _release()
            model = copy.deepcopy(self.model).train()
            if channels_last:
                model.to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, fused=True)  # as train.py

            def make():
                m = model if compile_mode is None else self._compile(model, compile_mode)

                def run():
                    return self._step(m, opt, _cl(x) if channels_last else x, y, dtype)
                return run

            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            row = self._variant(name, make, note=note)
            if dev.type == "cuda":
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
            return row

        rows = [variant("eager fp32 NCHW (baseline)", False, None)]
        if dt is not None:
            rows.append(variant("channels_last fp32", True, None))
        rows.append(variant(self.fast_name, True, dt))
        fast_row = rows[-1]
        notes = []
        inf = self.results.get("inference", {})
        if a.compile_on:
            mode = inf.get("best_compile_mode")
            if mode is None:
                notes.append("torch.compile skipped for training: it failed for inference")
            else:
                row = variant(f"{self.fast_name} + {self._compile_label(mode)}", True, dt, mode,
                              note="setup_s = compile time (first step)")
                rows.append(row)
                if row["img_s"] is None:
                    notes.append(f"torch.compile({mode}) failed for training: {row['error']}")
                elif fast_row["img_s"] and row["img_s"] <= fast_row["img_s"]:
                    notes.append(f"torch.compile({mode}) did not pay off for training")
        else:
            notes.append("torch.compile not measured" + (" (--quick)" if a.quick else " (--compile off)"))
        _release()
        return self._report("training", "2. Training step (forward, BCE, backward, AdamW; full fine-tuning)",
                            "train", rows, fast_row, notes)

    # --- 3. frozen backbone: cached vs uncached -------------------------------------------------
    def cached_epoch(self) -> dict[str, Any]:
        from chexformer.data.cache import compute_features
        from chexformer.model import build_model

        a, dev, dt = self.args, self.device, self.fast_dtype
        n, bs = a.epoch_images, a.batch_size
        g = torch.Generator().manual_seed(2)
        images = torch.randn(n, 3, a.img_size, a.img_size, generator=g)  # on the CPU, like a loader's output
        labels = torch.randint(0, 2, (n,), generator=g).float()

        _release()
        torch.manual_seed(0)
        model = build_model(self.cfg.replace(freeze_cnn=True), num_classes=2)
        model.load_state_dict(self.model.state_dict())
        model.to(dev).to(memory_format=torch.channels_last).train()
        assert model.backbone_frozen
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4,
                                fused=True)  # as train.py

        def uncached_epoch():
            for i in range(0, n, bs):
                xb = _cl(images[i:i + bs].to(dev, non_blocking=True))
                self._step(model, opt, xb, labels[i:i + bs].to(dev), dt)

        t0 = time.perf_counter()
        feats = compute_features(model, images, lambda t: t, batch_size=max(bs, 32), device=dev,
                                 autocast_dtype=dt, channels_last=True)
        _sync(dev)
        build_s = time.perf_counter() - t0

        def cached_epoch():
            for i in range(0, n, bs):
                fb = feats[i:i + bs].to(dev, non_blocking=True).float()  # as CachedFeatureDataset.get
                self._step(model, opt, fb, labels[i:i + bs].to(dev), dt, from_features=True)

        log.info("timing: frozen backbone, %d images, uncached epochs", n)
        # warm-up: one batch each (oneDNN primitives, allocator), then whole epochs
        self._step(model, opt, _cl(images[:bs].to(dev)), labels[:bs].to(dev), dt)
        uncached = _time(uncached_epoch, a.cache_epochs, 0, dev)
        log.info("timing: frozen backbone, %d images, cached epochs", n)
        self._step(model, opt, feats[:bs].to(dev).float(), labels[:bs].to(dev), dt, from_features=True)
        cached = _time(cached_epoch, max(a.cache_epochs, 3), 1, dev)
        u, c = statistics.median(uncached), statistics.median(cached)
        break_even = build_s / (u - c) if u > c else None
        result = {
            "images": n, "batch_size": bs, "feature_shape": list(feats.shape[1:]),
            "cache_mb": feats.numel() * feats.element_size() / 2**20,
            "uncached_epoch_s": u, "cached_epoch_s": c, "build_s": build_s,
            "uncached_img_s": n / u, "cached_img_s": n / c, "ratio": u / c,
            "break_even_epochs": break_even, "precision": self.fast_name,
        }
        self.results["cached_epoch"] = result
        _say("\n## 3. Frozen backbone: epoch over the same images without and with the feature cache")
        _say(f"{n} images, batch {bs}, {self.fast_name}; epoch = forward + BCE + backward + AdamW step of the "
             "transformer and head; data already in memory (loading is section 5)")
        _say(_table(["path", "epoch s", "img/s"], [
            ["uncached (frozen backbone forward every epoch)", _f(u, ".3f"), _f(n / u)],
            ["cached (forward_from_features on stored maps)", _f(c, ".4f"), _f(n / c)],
        ]))
        _say(f"per-epoch speed-up: {u / c:.1f}x; one-off cache build: {build_s:.2f} s "
             f"({result['cache_mb']:.1f} MB fp16); break-even after "
             + (f"{break_even:.2f} epochs (build / (uncached - cached))" if break_even else "never")
             + f". Training builds cache_views={self.cfg.cache_views} views per image with augmentation: "
             f"{self.cfg.cache_views}x the build time.")
        return result

    # --- 4. transformer share -----------------------------------------------------------------
    def transformer_share(self) -> dict[str, Any]:
        dev, dt, fast = self.device, self.fast_dtype, self.fast_model
        x = _cl(self.x)
        with torch.no_grad(), _autocast(dev, dt):
            feats = fast.forward_features(x)

        def backbone():
            with torch.no_grad(), _autocast(dev, dt):
                return fast.forward_features(_cl(self.x))

        def head():
            with torch.no_grad(), _autocast(dev, dt):
                return fast.forward_from_features(feats)

        b = self._variant("DenseNet121 backbone (forward_features)", lambda: backbone)
        t = self._variant("transformer + head (forward_from_features)", lambda: head)
        self._count_flops()
        pct = 100.0 * t["median_s"] / b["median_s"] if b["median_s"] and t["median_s"] else None
        result = {"backbone_img_s": b["img_s"], "transformer_img_s": t["img_s"], "backbone_s": b["median_s"],
                  "transformer_s": t["median_s"], "transformer_pct_of_backbone": pct,
                  "feature_shape": list(feats.shape[1:]), "precision": self.fast_name,
                  "backbone_gflops_per_image": self.flops.get("backbone", 0) / 1e9,
                  "transformer_gflops_per_image": self.flops.get("transformer", 0) / 1e9}
        fl_pct = (100 * self.flops["transformer"] / self.flops["backbone"]) if self.flops.get("backbone") else None
        result["transformer_flops_pct_of_backbone"] = fl_pct
        self.results["transformer_share"] = result
        _say(f"\n## 4. Transformer share ({self.fast_name}, eval, batch {self.args.batch_size}, "
             f"feature map {tuple(feats.shape[1:])})")
        _say(_table(["part", "ms/batch", "img/s", "GFLOP/image"], [
            ["DenseNet121 backbone", _f(b["median_s"] and 1e3 * b["median_s"], ".2f"), _f(b["img_s"]),
             _f(result["backbone_gflops_per_image"], ".3f")],
            ["transformer + head", _f(t["median_s"] and 1e3 * t["median_s"], ".2f"), _f(t["img_s"]),
             _f(result["transformer_gflops_per_image"], ".3f")],
        ]))
        _say(f"transformer time = {_f(pct, '.1f')}% of the backbone's (goal < {GOALS['transformer_pct']:.0f}%); "
             f"FLOPs: {_f(fl_pct, '.1f')}%")
        return result

    def _count_flops(self) -> None:
        """FLOPs of one image's forward (backbone, transformer + head), by FlopCounterMode."""
        if self.flops:
            return
        from torch.utils.flop_counter import FlopCounterMode

        x1 = self.x[:1]
        with torch.no_grad():
            with FlopCounterMode(display=False) as fc:
                feats = self.model.forward_features(x1)
            self.flops["backbone"] = float(fc.get_total_flops())
            with FlopCounterMode(display=False) as fc:
                self.model.forward_from_features(feats)
            self.flops["transformer"] = float(fc.get_total_flops())
        self.flops["forward"] = self.flops["backbone"] + self.flops["transformer"]

    # --- 5. data loading ----------------------------------------------------------------------
    def _image_files(self, tmp: Path) -> tuple[list[Path], str]:
        from chexformer.data import IMAGE_EXTENSIONS

        a = self.args
        root = Path(a.data_dir) if a.data_dir else DEFAULT_DATA
        files = []
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            step = max(1, len(files) // a.load_images)  # spread over the classes
            return files[::step][:a.load_images], f"{root} ({len(files)} files, {min(len(files), a.load_images)} used)"
        from chexformer.synthetic import make_synthetic_dataset

        log.info("no images under %s: writing %d synthetic PNGs", root, a.load_images)
        make_synthetic_dataset(tmp, n_per_class=max(2, math.ceil(a.load_images / 2)), img_size=max(a.img_size, 64),
                               seed=0, splits=("train",))
        files = sorted((tmp / "train").rglob("*.png"))[:a.load_images]
        return files, f"synthetic PNGs from chexformer.synthetic ({root} not found)"

    def data_loading(self) -> dict[str, Any]:
        from chexformer.checkpoint import IMAGENET_MEAN, IMAGENET_STD
        from chexformer.data import build_transforms, load_image, resize_image

        S = self.args.img_size
        with tempfile.TemporaryDirectory(prefix="chexformer-bench-") as tmp:
            files, source = self._image_files(Path(tmp))

            def decode_all():
                return [resize_image(load_image(p, size_hint=S), S) for p in files]

            self.images_uint8 = decode_all()  # warms the page cache and the decoders
            t0 = time.perf_counter()
            decode_all()
            decode_s = (time.perf_counter() - t0) / len(files)
        train_t = build_transforms(self.cfg, train=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        eval_t = build_transforms(self.cfg, train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        reps = max(1, math.ceil(64 / len(self.images_uint8)))

        def per_image(transform) -> float:
            for img in self.images_uint8[:4]:
                transform(img)
            t0 = time.perf_counter()
            for _ in range(reps):
                for img in self.images_uint8:
                    transform(img)
            return (time.perf_counter() - t0) / (reps * len(self.images_uint8))

        augment_s, normalise_s = per_image(train_t), per_image(eval_t)
        tr = self.results.get("training", {})
        train_rows = [r for r in tr.get("rows", []) if r["img_s"]]
        train_img_s = max((r["img_s"] for r in train_rows), default=None)
        with_preload = 1.0 / augment_s  # decoded once by XrayDataset(preload=True); augmentation every epoch
        without_preload = 1.0 / (decode_s + augment_s)
        workers = self.cfg.num_workers

        def verdict(rate: float) -> dict[str, Any]:
            if not train_img_s:
                return {"loader_img_s_per_thread": rate}
            threads = train_img_s / rate
            return {"loader_img_s_per_thread": rate, "threads_to_keep_up": threads,
                    "bottleneck_with_one_thread": rate < train_img_s,
                    "bottleneck_with_default_workers": threads > max(workers, 1),
                    "share_of_epoch_if_serial_pct": 100.0 * (1 / rate) / (1 / rate + 1 / train_img_s)}

        result = {"source": source, "files": len(files), "img_size": S,
                  "decode_resize_img_s": 1 / decode_s, "augment_img_s": 1 / augment_s,
                  "normalise_only_img_s": 1 / normalise_s, "train_step_img_s": train_img_s,
                  "default_num_workers": workers,
                  "without_preload": verdict(without_preload), "with_preload": verdict(with_preload)}
        self.results["data_loading"] = result
        _say(f"\n## 5. Data loading (one thread, {S} px; images: {source})")
        _say(_table(["stage", "img/s (1 thread)"], [
            ["decode + resize (load_image + resize_image)", _f(1 / decode_s)],
            ["augment preloaded uint8 (build_transforms(train=True))", _f(1 / augment_s)],
            ["normalise only (build_transforms(train=False))", _f(1 / normalise_s)],
            ["training step, fastest path (section 2)", _f(train_img_s)],
        ]))
        for label, key in (("without preload (decode + resize + augment every epoch)", "without_preload"),
                           ("with preload (XrayDataset(preload=True): augment only)", "with_preload")):
            v = result[key]
            if "threads_to_keep_up" not in v:
                _say(f"{label}: {v['loader_img_s_per_thread']:.1f} img/s per thread")
                continue
            _say(f"{label}: {v['loader_img_s_per_thread']:.1f} img/s per thread, "
                 f"{v['threads_to_keep_up']:.2f} loader threads to keep up with training -> "
                 + ("WOULD be the bottleneck" if v["bottleneck_with_one_thread"] else "not the bottleneck")
                 + f" with one loader thread, {'would' if v['bottleneck_with_default_workers'] else 'not'} with "
                 f"num_workers={workers}; {v['share_of_epoch_if_serial_pct']:.0f}% of the epoch if loading runs "
                 "serially (num_workers=0)")
        if self.device.type == "cpu":
            _say("note: on a CPU run, loader workers share the cores with the training step")
        return result

    # --- 6. bf16 accuracy cost ----------------------------------------------------------------
    def accuracy(self) -> dict[str, Any]:
        from chexformer.checkpoint import IMAGENET_MEAN, IMAGENET_STD
        from chexformer.data import build_transforms

        dev, dt = self.device, self.fast_dtype
        if dt is None:
            result = {"skipped": "no native bf16 on this CPU: the fast path is fp32"}
            self.results["bf16_accuracy"] = result
            _say(f"\n## 6. bf16 accuracy cost: skipped ({result['skipped']})")
            return result
        batches = {"random normalised inputs": self.x}
        if self.images_uint8:
            eval_t = build_transforms(self.cfg, train=False, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            imgs = self.images_uint8[:self.args.batch_size]
            batches["real/synthetic images"] = torch.stack([eval_t(i) for i in imgs]).to(dev)
        result: dict[str, Any] = {"dtype": str(dt)[6:], "weights": "pretrained" if self.args.pretrained_path
                                  else "random init (no --pretrained-path)"}
        rows = []
        for name, xb in batches.items():
            with torch.no_grad():
                ref = self.model(xb).float()
                with _autocast(dev, dt):
                    low = self.fast_model(_cl(xb)).float()
            diff = (low - ref).abs()
            pdiff = (torch.sigmoid(low) - torch.sigmoid(ref)).abs()
            entry = {"images": len(xb), "max_abs_logit_diff": diff.max().item(),
                     "mean_abs_logit_diff": diff.mean().item(), "max_abs_prob_diff": pdiff.max().item(),
                     "logit_range": [ref.min().item(), ref.max().item()]}
            result[name] = entry
            rows.append([name, entry["images"], f"{entry['max_abs_logit_diff']:.2e}",
                         f"{entry['mean_abs_logit_diff']:.2e}", f"{entry['max_abs_prob_diff']:.2e}",
                         f"{ref.min().item():.3f}..{ref.max().item():.3f}"])
        self.results["bf16_accuracy"] = result
        _say(f"\n## 6. bf16 accuracy cost (eval; fp32 NCHW vs {self.fast_name}; {result['weights']})")
        _say(_table(["inputs", "n", "max abs dlogit", "mean abs dlogit", "max abs dprob", "fp32 logit range"], rows))
        return result

    # --- 7. GPU peak fraction -----------------------------------------------------------------
    def gpu_utilisation(self) -> dict[str, Any] | None:
        if self.device.type != "cuda":
            return None
        self._count_flops()
        name = torch.cuda.get_device_name(self.device)
        peak = gpu_peak_tflops(name)
        fwd = self.flops["forward"]
        out: dict[str, Any] = {"gpu": name, "peak_bf16_tflops": peak, "forward_gflops_per_image": fwd / 1e9,
                               "train_gflops_per_image": 3 * fwd / 1e9, "rows": []}
        table = []
        for section, mult in (("inference", 1), ("training", 3)):
            for r in self.results.get(section, {}).get("rows", []):
                if not r["img_s"]:
                    continue
                tflops = mult * fwd * r["img_s"] / 1e12
                frac = tflops / peak if peak else None
                out["rows"].append({"section": section, "name": r["name"], "tflops": tflops, "peak_fraction": frac})
                table.append([section, r["name"], f"{tflops:.1f}", _f(frac and 100 * frac, ".1f", "unknown")])
        self.results["gpu"] = out
        _say(f"\n## 7. GPU: {name}; bf16 dense peak "
             + (f"{peak:.0f} TFLOP/s" if peak else "unknown (card not in the table)")
             + f"; {fwd / 1e9:.2f} GFLOP per image forward (FlopCounterMode), x3 for a training step")
        _say(_table(["section", "variant", "achieved TFLOP/s", "% of bf16 peak"], table))
        return out

    # --- printing -------------------------------------------------------------------------------
    def _report(self, section: str, title: str, kind: str, rows: list[dict[str, Any]], fast_row: dict[str, Any],
                notes: list[str], **extra: Any) -> dict[str, Any]:
        """Ratios against the first row (the baseline), the section's result kept and printed."""
        baseline = rows[0]
        for row in rows:
            row["ratio"] = row["img_s"] / baseline["img_s"] if row["img_s"] and baseline["img_s"] else None
        fastest = max((r for r in rows if r["img_s"]), key=lambda r: r["img_s"], default=None)
        result = {"rows": rows, "baseline": baseline["name"], "fast_path": fast_row["name"],
                  "fastest": fastest["name"] if fastest else None, "notes": notes, **extra}
        self.results[section] = result
        self._print_rows(title, rows, kind)
        _say(f"fastest: {result['fastest']}" + (f" ({fastest['ratio']:.2f}x the baseline)" if fastest else ""))
        for n in notes:
            _say(f"note: {n}")
        return result

    def _print_rows(self, title: str, rows: list[dict[str, Any]], kind: str) -> None:
        self._count_flops()
        mult = 3 if kind == "train" else 1
        _say(f"\n## {title}: batch {self.args.batch_size}, {self.args.img_size} px, "
             f"median of {self.args.iters} after {self.args.warmup} warm-up")
        table = []
        for r in rows:
            if r["img_s"] is None:
                table.append([r["name"], "failed", "-", "-", _f(r["setup_s"], ".2f"), "-", r["error"]])
                continue
            tflops = mult * self.flops["forward"] * r["img_s"] / 1e12
            table.append([r["name"], _f(r["img_s"]), _f(r["ratio"], ".2f") + "x", f"{tflops:.3f}",
                          _f(r["setup_s"], ".2f"), _f(r["max_abs_logit_diff"], ".2e"), r.get("note", "")])
        headers = ["variant", "img/s", "vs baseline", "TFLOP/s", "setup s", "max abs dlogit vs fp32", "note"]
        if kind == "train":
            headers[5] = "-"
        _say(_table(headers, table))

    def summary(self) -> list[dict[str, Any]]:
        def best(section):
            s = self.results.get(section, {})
            rows = s.get("rows", [])
            base = rows[0] if rows else {}
            fast = next((r for r in rows if r["name"] == s.get("fastest")), {})
            return base.get("img_s"), fast.get("img_s"), fast.get("name")

        rows = []
        b, f, name = best("inference")
        rows.append({"measurement": f"inference ({name})", "key": "inference", "baseline_img_s": b,
                     "fast_img_s": f, "ratio": f / b if b and f else None,
                     "goal": f">= {GOALS['inference']:g}x"})
        b, f, name = best("training")
        rows.append({"measurement": f"training step ({name})", "key": "training", "baseline_img_s": b,
                     "fast_img_s": f, "ratio": f / b if b and f else None, "goal": f">= {GOALS['training']:g}x"})
        c = self.results.get("cached_epoch", {})
        rows.append({"measurement": "frozen-backbone epoch, cached vs uncached", "key": "cached_epoch",
                     "baseline_img_s": c.get("uncached_img_s"), "fast_img_s": c.get("cached_img_s"),
                     "ratio": c.get("ratio"), "goal": f">= {GOALS['cached_epoch']:g}x"})
        t = self.results.get("transformer_share", {})
        rows.append({"measurement": "transformer + head vs backbone (time)", "key": "transformer_share",
                     "baseline_img_s": t.get("backbone_img_s"), "fast_img_s": t.get("transformer_img_s"),
                     "ratio": t.get("transformer_pct_of_backbone"), "ratio_unit": "% of backbone",
                     "goal": f"< {GOALS['transformer_pct']:g}% of backbone"})
        rows = [r for r in rows if r["key"] in self.results]  # the sections that ran
        for r in rows:
            v = r["ratio"]
            if v is None:
                r["goal_met"] = None
            elif r["key"] == "transformer_share":
                r["goal_met"] = v < GOALS["transformer_pct"]
            else:
                r["goal_met"] = v >= GOALS[r["key"]]
        self.results["summary"] = rows
        _say("\n## Summary (goals are targets, printed, not asserted)")
        table = []
        for r in rows:
            ratio = (_f(r["ratio"], ".1f") + "%") if r["key"] == "transformer_share" else _f(r["ratio"], ".2f") + "x"
            met = {True: "met", False: "not met", None: "-"}[r["goal_met"]]
            table.append([r["measurement"], _f(r["baseline_img_s"]), _f(r["fast_img_s"]), ratio,
                          f"{r['goal']} ({met})"])
        _say(_table(["measurement", "baseline img/s", "fast img/s", "ratio", "goal"], table))
        return rows


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--img-size", type=int, help="input side (default 224; 64 with --quick)")
    p.add_argument("--batch-size", type=int, help="batch (default 32; 4 with --quick)")
    p.add_argument("--iters", type=int, help="timed iterations per variant (default 10; 2 with --quick)")
    p.add_argument("--warmup", type=int, help="untimed warm-up calls per variant (default 3; 1 with --quick)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", metavar="OUT.json", help="also write every number to this file")
    p.add_argument("--cpu-bf16", action="store_true",
                   help="on a CPU without native bf16, measure bf16 autocast anyway (emulated)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                   help="the sections to run (default: all)")
    p.add_argument("--quick", action="store_true", help="64 px, batch 4, 2 iterations, no compile: smoke test")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="measure torch.compile (auto: on, off with --quick; CPU compiles take minutes)")
    p.add_argument("--compile-modes", default="default,max-autotune-no-cudagraphs",
                   help="comma-separated torch.compile modes to try (default: %(default)s)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (default: %(default)s; 'eager'/'aot_eager' only check the code path)")
    p.add_argument("--jit", default="auto", choices=["auto", "on", "off"],
                   help="measure torch.jit.trace + freeze on CPU (auto: on)")
    p.add_argument("--epoch-images", type=int, help="images per epoch in section 3 (default 256; 64 with --quick)")
    p.add_argument("--cache-epochs", type=int, help="uncached epochs timed in section 3 (default 2; 1 with --quick)")
    p.add_argument("--load-images", type=int, help="image files decoded in section 5 (default 128; 8 with --quick)")
    p.add_argument("--data-dir", help=f"image folder for section 5 (default {DEFAULT_DATA}; synthetic if absent)")
    p.add_argument("--pretrained-path", help="backbone weights (CheXNet/torchvision); default: random init")
    p.add_argument("--d-model", type=int, help="encoder width (default: Config's 256)")
    p.add_argument("--num-heads", type=int, help="attention heads (default: Config's 8)")
    p.add_argument("--ffn-dim", type=int, help="feed-forward width (default: Config's 512)")
    p.add_argument("--num-layers", type=int, help="encoder layers (default: Config's 2)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.img_size < 32 or args.img_size % 32:
        p.error(f"--img-size must be a positive multiple of 32, got {args.img_size}")
    for key in ("batch_size", "iters", "epoch_images", "cache_epochs", "load_images"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.compile_on = args.compile == "on" or (args.compile == "auto" and not args.quick)
    args.jit_on = args.jit != "off"
    args.compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    env = environment(bench.device, bench.fast_dtype)
    bench.results["env"] = env
    bench.results["config"] = {k: getattr(args, k) for k in (
        "img_size", "batch_size", "iters", "warmup", "device", "quick", "compile_on", "compile_modes",
        "compile_backend", "jit_on", "epoch_images", "cache_epochs", "load_images")} | {
        "model": {k: getattr(bench.cfg, k) for k in ("d_model", "num_heads", "ffn_dim", "num_layers", "dropout_rate")}}
    _say("# chexformer speed benchmark" + ("  (--quick: smoke test, numbers are meaningless)" if args.quick else ""))
    _say(f"CPU: {env['cpu']} [{env['cpu_id']}] ({env['cpu_count']} logical CPUs, {env['cpu_affinity']} usable; "
         f"AMX {env['cpu_amx']}, AVX512-BF16 {env['cpu_avx512_bf16']}, native bf16 {env['cpu_bf16_native']})")
    _say(f"torch {env['torch']}, {env['threads']} threads (OMP_NUM_THREADS={env['omp_num_threads']}), "
         f"device {env['device']}" + (f", GPU {env['gpu']}" if "gpu" in env else ""))
    _say(f"model: ChexFormer, DenseNet121 + {bench.cfg.num_layers} layers, d_model {bench.cfg.d_model}, "
         f"{bench.cfg.num_heads} heads, ffn {bench.cfg.ffn_dim}; {args.img_size} px, batch {args.batch_size}; "
         f"fast path: {bench.fast_name}")
    start = time.perf_counter()
    for section in args.sections:
        getattr(bench, section)()
    bench.gpu_utilisation()
    bench.summary()
    bench.results["seconds"] = time.perf_counter() - start
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_jsonable(bench.results), indent=2))
        _say(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
