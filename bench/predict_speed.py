"""End-to-end prediction speed: ``chexformer predict`` against torchxrayvision's DenseNet121 on the
same files in the same run (ratios, not absolute limits).

    python bench/predict_speed.py [--data-dir ../shared/data/kermany224/train] [--n 624] [--checkpoint CKPT]

Both sides start from file paths and end with one probability per file:

* chexformer: ``Predictor.from_checkpoint(...).predict_files`` as ``chexformer predict`` runs it
  (decode in threads overlapping the model, the intensity rule, resize, bf16 where native; model
  set-up time included), with and without the out-of-population guard, with ``--backend jit``, and
  in fp32;
* torchxrayvision 1.x: its documented pipeline (``skimage.io.imread`` -> ``xrv.datasets.normalize``
  -> ``XRayCenterCrop`` -> ``XRayResizer(224)``) and ``xrv.models.DenseNet`` (DenseNet121 at
  224 px, fp32, batches of 32). Its pretrained weights need a download, so the network runs with
  random weights: the arithmetic is the same.

Without ``--checkpoint`` a 224 px chexformer checkpoint with random weights (seed defaults) is
written to a temporary folder. Files are read in place; nothing is copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path, n: int) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        raise SystemExit(f"no images under {root}")
    step = max(1, len(files) // n)
    return files[::step][:n]


def _checkpoint(tmp: Path) -> Path:
    from chexformer import Config
    from chexformer.checkpoint import CheckpointMeta
    from chexformer.model import build_model

    cfg = Config(backbone_weights="none")
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2)
    meta = CheckpointMeta(config=cfg, class_names=["NORMAL", "PNEUMONIA"], epoch=0)
    path = tmp / "random224.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "chexformer": meta.to_dict()}, path)
    return path


def run_chexformer(ckpt: Path, files: list[Path], backend: str, precision: str, guard: bool,
                   batch_size: int) -> tuple[float, np.ndarray]:
    from chexformer.inference import Predictor

    start = time.perf_counter()
    pred = Predictor.from_checkpoint(ckpt, device="cpu", precision=precision, backend=backend, batch_size=batch_size)
    out = pred.predict_files(files, batch_size=batch_size, guard=guard)
    seconds = time.perf_counter() - start
    return seconds, np.array([r.probabilities[1] for r in out])


def run_xrv(files: list[Path], batch_size: int) -> float:
    import skimage.io
    import torchvision
    import torchxrayvision as xrv

    start = time.perf_counter()
    model = xrv.models.DenseNet(weights=None, op_threshs=None).eval()
    transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)])
    batch = []
    with torch.no_grad():
        for i, f in enumerate(files):
            img = xrv.datasets.normalize(skimage.io.imread(f), 255)
            if img.ndim == 3:
                img = img.mean(2)
            batch.append(torch.from_numpy(transform(img[None, ...])))
            if len(batch) == batch_size or i == len(files) - 1:
                model(torch.stack(batch).float())
                batch = []
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data" / "kermany224" / "train")
    p.add_argument("--n", type=int, default=624)
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    files = _files(a.data_dir, a.n)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.checkpoint or _checkpoint(Path(tmp))
        rows = {}
        xrv_s = run_xrv(files, a.batch_size)
        rows["torchxrayvision DenseNet121 (fp32, eager)"] = xrv_s
        t_fast, p_fast = run_chexformer(ckpt, files, "eager", "auto", True, a.batch_size)
        rows["chexformer predict, defaults (eager, bf16 where native, guard if present)"] = t_fast
        t_ng, _ = run_chexformer(ckpt, files, "eager", "auto", False, a.batch_size)
        rows["chexformer predict, guard off"] = t_ng
        t_jit, p_jit = run_chexformer(ckpt, files, "jit", "auto", True, a.batch_size)
        rows["chexformer --backend jit (trace + freeze + oneDNN, set-up included)"] = t_jit
        t_ref, p_ref = run_chexformer(ckpt, files, "eager", "32", True, a.batch_size)
        rows["chexformer eager fp32"] = t_ref
    n = len(files)
    print(f"{n} files from {a.data_dir}, batch {a.batch_size}, {torch.get_num_threads()} threads\n")
    print(f"{'path':<75} {'img/s':>8} {'vs xrv':>7}")
    result = {"n_files": n, "rows": {}}
    for name, s in rows.items():
        print(f"{name:<75} {n / s:8.1f} {xrv_s / s:6.2f}x")
        result["rows"][name] = {"seconds": s, "img_per_s": n / s, "ratio_vs_xrv": xrv_s / s}
    gap = float(np.abs(p_fast - p_ref).max())
    gap_jit = float(np.abs(p_jit - p_ref).max())
    print(f"\nmax |p - p_eager_fp32| over the files: defaults {gap:.2e}, jit {gap_jit:.2e}")
    result["max_prob_gap_vs_fp32"] = {"defaults": gap, "jit": gap_jit}
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
