"""Same picture, same answer: score every format of the same radiographs with one checkpoint.

    python bench/format_probe.py --checkpoint runs/kermany/checkpoints/best.ckpt \\
        [--images ../shared/data/raw-samples] [--json OUT.json]

Each full-size original under ``--images`` is written (to a temporary folder, deleted afterwards)
as an 8-bit PNG, a 16-bit PNG (pixels x 257), a 12-bit PNG, a 16-bit TIFF, a JPEG (quality 95) and
four DICOMs (MONOCHROME2; MONOCHROME1 inverted; a window covering the data; rescale slope and
intercept), and every file is scored through the one inference path (``Predictor``, the defaults
of ``chexformer predict``). Printed: per image the spread (max - min) of P(positive) over the nine
files, and the largest spread overall (the correctness issue's bar: <= 0.01).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs) -> Path:
    """A minimal 16-bit single-frame (or multi-frame for 3-D ``pixels``) DICOM file."""
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


def write_every_format(v8: np.ndarray, folder: Path) -> dict[str, Path]:
    """The 8-bit grey picture ``v8`` in nine encodings; returns name -> file."""
    folder.mkdir(parents=True, exist_ok=True)
    v16 = v8.astype(np.uint16) * 257
    v12 = np.rint(v8.astype(np.float64) * 4095 / 255).astype(np.uint16)
    out = {"png8": folder / "a.png", "png16": folder / "a16.png", "png12": folder / "a12.png",
           "tiff16": folder / "a16.tif", "jpeg95": folder / "a.jpeg"}
    Image.fromarray(v8).save(out["png8"])
    Image.fromarray(v16).save(out["png16"])
    Image.fromarray(v12).save(out["png12"])
    Image.fromarray(v16).save(out["tiff16"])
    Image.fromarray(v8).save(out["jpeg95"], quality=95)
    out["dicom_mono2"] = write_dicom(folder / "m2.dcm", v12)
    out["dicom_mono1"] = write_dicom(folder / "m1.dcm", (4095 - v12).astype(np.uint16), "MONOCHROME1")
    out["dicom_window"] = write_dicom(folder / "w.dcm", v12, WindowCenter=2047.5, WindowWidth=4096)
    out["dicom_rescaled"] = write_dicom(folder / "r.dcm", v12, RescaleSlope=2, RescaleIntercept=-1024)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--images", type=Path, default=REPO.parent / "shared" / "data" / "raw-samples")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    from chexformer.inference import Predictor

    predictor = Predictor.from_checkpoint(a.checkpoint)
    sources = sorted(f for f in a.images.rglob("*") if f.suffix.lower() in (".jpeg", ".jpg", ".png"))
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, src in enumerate(sources):
            files = write_every_format(np.asarray(Image.open(src).convert("L")), Path(tmp) / str(k))
            preds = predictor.predict_files(list(files.values()))
            probs = {name: r.probabilities[1] for name, r in zip(files, preds)}
            lossless = [v for k, v in probs.items() if k != "jpeg95"]
            result[src.name] = {"spread": max(probs.values()) - min(probs.values()),
                                "spread_lossless": max(lossless) - min(lossless), "probabilities": probs}
            print(f"{src.name:<40} spread {result[src.name]['spread']:.5f}  png8 {probs['png8']:.4f}  "
                  f"jpeg95 {probs['jpeg95']:.4f}  dicom_mono1 {probs['dicom_mono1']:.4f}", flush=True)
    worst = max(r["spread"] for r in result.values())
    worst_lossless = max(r["spread_lossless"] for r in result.values())
    print(f"\nlargest spread over {len(result)} radiographs x 9 formats: {worst:.5f} (bar: 0.01); "
          f"without the JPEG: {worst_lossless:.5f}")
    if a.json:
        a.json.write_text(json.dumps({"largest_spread": worst, "largest_spread_lossless": worst_lossless,
                                      "images": result}, indent=2))


if __name__ == "__main__":
    main()
