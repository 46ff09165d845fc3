import logging
from pathlib import Path

import numpy as np
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


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
