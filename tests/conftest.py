import logging
from pathlib import Path

import pytest
import torch

from chexformer import Config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _small_torch():
    """Deterministic, quiet tests on a small CPU."""
    torch.manual_seed(0)
    logging.getLogger("chexformer").setLevel(logging.INFO)
    yield


@pytest.fixture
def tiny_cfg() -> Config:
    return Config(img_size=64, d_model=32, num_heads=4, ffn_dim=64, num_layers=2, batch_size=4, dropout_rate=0.1)
