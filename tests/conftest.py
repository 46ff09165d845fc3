import logging
import os
from pathlib import Path

import pytest
import torch

from chexformer import Config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    """Under pytest-xdist (``-n logical`` in pyproject's addopts) each worker gets one torch
    thread, and so do the processes its tests start (training CLIs, DDP ranks), so the workers
    share the cores instead of oversubscribing them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _small_torch():
    """Deterministic, quiet tests on a small CPU."""
    torch.manual_seed(0)
    logging.getLogger("chexformer").setLevel(logging.INFO)
    yield


@pytest.fixture
def tiny_cfg() -> Config:
    return Config(img_size=64, d_model=32, num_heads=4, ffn_dim=64, num_layers=2, batch_size=4, dropout_rate=0.1)


def write_checkpoint(path: Path, cfg: Config, class_names=("NORMAL", "PNEUMONIA"), threshold=0.5,
                     temperature=1.0, seed=0) -> Path:
    """A chexformer checkpoint of a randomly initialised model, as ``train`` writes it."""
    from chexformer.checkpoint import CheckpointMeta
    from chexformer.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg, num_classes=len(class_names))
    meta = CheckpointMeta(config=cfg, class_names=list(class_names), threshold=threshold, temperature=temperature,
                          epoch=0, extra={"val_predictions": {"logits": [-2.0, -1.0, 0.5, 1.0, 2.0, -0.5],
                                                              "labels": [0, 0, 1, 1, 1, 0]}})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "chexformer": meta.to_dict()}, path)
    return path


def write_dicom(*args, **kwargs):
    """A minimal DICOM file (see bench/format_probe.py, which the benchmark and the tests share)."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    from format_probe import write_dicom as _write

    return _write(*args, **kwargs)
