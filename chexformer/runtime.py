"""Device and precision choices shared by training, prediction and benchmarks, and the check of an
output file before the work that fills it."""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["cpu_supports_bf16", "resolve_accelerator", "resolve_precision", "autocast_dtype", "default_device",
           "host_environment", "check_output_file"]


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
    if acc in ("gpu", "cuda"):  # native bf16 (Ampere on): a V100 or T4 emulates it, slowly, so fp16 there
        return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    if acc == "cpu" and cpu_supports_bf16():
        return "bf16-mixed"
    return "32"


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


def default_device(accelerator: str = "auto") -> torch.device:
    return torch.device("cuda" if resolve_accelerator(accelerator) in ("gpu", "cuda") else "cpu")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def host_environment(device: torch.device | None = None) -> dict[str, Any]:
    """The machine and library versions a run computed on (the GPU's name where ``device`` is one).

    Training is deterministic on one host, but bf16 and oneDNN kernels differ between CPU
    generations that share a model name ("Intel(R) Xeon(R) Processor"), so the same seed and code
    can train a different model elsewhere; family/model/stepping tell such hosts apart."""
    import lightning
    import torchvision

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    env: dict[str, Any] = {
        "cpu": info.get("model name") or platform.processor() or platform.machine() or "unknown",
        "cpu_id": " ".join(f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info) or None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_native": cpu_supports_bf16(),
        "cpu_amx": "amx_tile" in flags,
        "cpu_avx512_bf16": "avx512_bf16" in flags,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
    }
    if device is not None and device.type == "cuda":  # not merely present: a CPU run on a GPU machine is a CPU run
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def check_output_file(path: str | os.PathLike, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """``path`` as a file this command may write, checked before the work that fills it: not a
    folder, not one of the ``protect`` files (the checkpoint, the input images), and in a folder
    that exists or can be made and is writable. Raises ``ValueError`` naming the problem."""
    if not str(path).strip():
        raise ValueError("the output file name is empty")
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"output {out} is a folder; name a file inside it")
    target = out.resolve()
    for other in protect:
        if Path(other).resolve() == target:
            raise ValueError(f"output {out} is also an input of this command ({other}); writing it would "
                             "destroy that input. Choose another output file.")
    if out.exists():  # replaced in place (/dev/null too): the file itself must be writable
        if not os.access(out, os.W_OK):
            raise ValueError(f"output {out} is not writable")
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the folder of output {out}: {exc.strerror or exc}") from None
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"output {out}: its folder is not writable")
    return out
