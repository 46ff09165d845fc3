"""Device and precision choices shared by training, prediction and benchmarks."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

__all__ = ["cpu_supports_bf16", "resolve_accelerator", "resolve_precision", "autocast_dtype", "default_device"]


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch
        return False


def resolve_accelerator(accelerator: str = "auto") -> str:
    if accelerator != "auto":
        return accelerator
    if torch.cuda.is_available():
        return "gpu"
    return "cpu"


def resolve_precision(precision: str = "auto", accelerator: str = "auto") -> str:
    """'auto' becomes 'bf16-mixed' where the hardware computes bf16 natively, else '32'."""
    if precision != "auto":
        return precision
    acc = resolve_accelerator(accelerator)
    if acc in ("gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if acc == "cpu" and cpu_supports_bf16():
        return "bf16-mixed"
    return "32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def default_device(accelerator: str = "auto") -> torch.device:
    return torch.device("cuda" if resolve_accelerator(accelerator) in ("gpu", "cuda") else "cpu")
