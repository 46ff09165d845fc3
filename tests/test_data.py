"""Contracts of chexformer.data and chexformer.synthetic: reading every image kind, scanning messy
folders, layout errors, patient grouping, patient-level splits, datasets and transforms.

Real-data checks read ``../shared/data`` (relative to the repository root) and skip when it is absent.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from chexformer import shifts
from chexformer.config import DEFAULT_PATIENT_REGEX, Config
from chexformer.data import (
    IMAGE_EXTENSIONS,
    DatasetLayoutError,
    ImageReadError,
    Sample,
    XrayDataset,
    build_transforms,
    class_counts,
    describe,
    load_image,
    patient_id,
    read_split_csv,
    resize_image,
    scan_folder,
    split_by_patient,
    standardize_intensity,
    write_split_csv,
)
from chexformer.synthetic import make_synthetic_dataset, synthetic_image

from .conftest import write_dicom as _write_dicom

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"
KERMANY_TRAIN = SHARED_DATA / "kermany224" / "train"
RAW_SAMPLES = SHARED_DATA / "raw-samples"
LAYOUT_LINE = "train/<CLASS_A>/*.png|jpg|dcm"


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _gradient(h: int = 32, w: int = 40) -> np.ndarray:
    return (np.add.outer(np.arange(h) * 3, np.arange(w) * 2) % 256).astype(np.uint8)


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def _jpeg_bytes(seed: int = 0, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _grey(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])
    return arr[..., 0].astype(int)


def _two_class(root: Path, n: int = 2) -> Path:
    for k in range(n):  # distinct content: identical bytes would share a group
        _save(Image.fromarray(_gradient() + k), root / "NORMAL" / f"IM-{k + 1:04d}-0001.png")
        _save(Image.fromarray(_gradient()[::-1] + k), root / "PNEUMONIA" / f"person{k + 1}_bacteria_{k + 1}.png")
    return root


# ----------------------------------------------------------------------------------------------
# Patient ids
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("person1234_bacteria_5678.jpeg", "person1234"),
        ("person57_virus_114.jpeg", "person57"),
        ("person1_virus_6_2.jpeg", "person1"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0115-0001.jpeg", "IM-0115"),
        ("IM-0620-0001-0002.jpeg", "IM-0620"),
        ("scan_0001.png", None),
        ("IM-0115.png", None),  # no image number after the patient: not the Kermany pattern
    ],
)
def test_patient_id_kermany_names(name, expected):
    assert patient_id(Path("data/train/X") / name, DEFAULT_PATIENT_REGEX) == expected


def test_patient_id_whole_match_without_groups():
    assert patient_id("P00042_view2.png", r"P\d+") == "P00042"


def test_unmatched_names_get_own_groups_and_one_warning(tmp_path, caplog):
    root = _two_class(tmp_path / "train")
    _save(Image.fromarray(_gradient(20, 20)), root / "NORMAL" / "scan_001.png")
    _save(Image.fromarray(_gradient(21, 20)), root / "NORMAL" / "scan_002.png")
    with caplog.at_level(logging.WARNING, logger="chexformer.data"):
        result = scan_folder(root)
    groups = {s.path.name: s.group for s in result.samples}
    assert groups["IM-0001-0001.png"] == "IM-0001"
    assert groups["scan_001.png"] != groups["scan_002.png"]
    assert groups["scan_001.png"].startswith("file:")
    warnings = [r for r in caplog.records if "do not match patient_regex" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 6" in warnings[0].getMessage()
    assert result.extra["unmatched_names"] == 2


# ----------------------------------------------------------------------------------------------
# load_image
# ----------------------------------------------------------------------------------------------
def test_load_image_scales_16_bit_png_by_its_range(tmp_path):
    values = np.linspace(1000, 3000, 64 * 32).reshape(32, 64).astype(np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "x16.png")
    assert Image.open(path).mode.startswith("I")
    grey = _grey(load_image(path))
    assert grey.min() == 0 and grey.max() == 255
    assert np.all(np.diff(grey.ravel()) >= 0)  # monotonic, not wrapped or clipped by >> 8


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I", "F", "I;16"])
def test_load_image_returns_rgb8_for_every_mode(tmp_path, mode):
    base = Image.fromarray(_gradient())
    img = Image.fromarray(np.asarray(base, np.float32) * 10.0, "F").convert(mode) if mode in ("I", "F") else (
        base.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(base).astype(np.uint16) * 200)
    )
    suffix = ".tif" if mode in ("I", "F", "CMYK") else ".png"
    path = _save(img, tmp_path / f"img{suffix}")
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (40, 32)
    if mode in ("L", "I", "F", "I;16"):  # one rule for every depth: the image's own percentiles -> 0..255
        assert np.abs(_grey(out).astype(int) - standardize_intensity(np.asarray(base))).max() <= 1


def _picture(h: int = 48, w: int = 40) -> np.ndarray:
    """A smooth 8-bit grey picture (so every encoding keeps its ranks)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.clip(40 + 3 * yy + 2 * xx + 20 * np.sin(xx / 3.0), 0, 255).astype(np.uint8)


def test_intensity_rule_is_linear_invariant():
    v = _picture().astype(np.float64)
    ref = standardize_intensity(v).astype(int)
    for scaled in (v * 257, v * 16 + 7):
        assert np.abs(standardize_intensity(scaled).astype(int) - ref).max() <= 1
    assert np.abs(255 - standardize_intensity(-3 * v + 1e4).astype(int) - ref).max() <= 1  # negated: inverted
    assert standardize_intensity(np.full((8, 8), 7.0)).max() == 0  # flat image: black, no division by zero


def test_same_picture_same_pixels_in_every_format(tmp_path):
    """8-bit PNG, 16-bit PNG (x 257), 12-bit PNG, 16-bit TIFF, DICOM MONOCHROME2 with and without a
    window covering the data, and MONOCHROME1 decode to (nearly) the same bytes; JPEG close to them."""
    v8 = _picture()
    ref = _grey(load_image(_save(Image.fromarray(v8), tmp_path / "p8.png"))).astype(int)
    v16 = v8.astype(np.uint16) * 257
    v12 = np.rint(v8.astype(np.float64) * 4095 / 255).astype(np.uint16)
    files = {
        "png16": _save(Image.fromarray(v16), tmp_path / "p16.png"),
        "png12": _save(Image.fromarray(v12), tmp_path / "p12.png"),
        "tiff16": _save(Image.fromarray(v16), tmp_path / "p16.tif"),
        "dicom": _write_dicom(tmp_path / "m2.dcm", v12),
        "dicom_window": _write_dicom(tmp_path / "w.dcm", v12, WindowCenter=2047.5, WindowWidth=4096),
        "dicom_mono1": _write_dicom(tmp_path / "m1.dcm", (4095 - v12).astype(np.uint16), "MONOCHROME1"),
    }
    for name, path in files.items():
        assert np.abs(_grey(load_image(path)).astype(int) - ref).max() <= 1, name
    jpeg = _grey(load_image(_save(Image.fromarray(v8), tmp_path / "p.jpeg", quality=95))).astype(int)
    assert np.abs(jpeg - ref).mean() < 2.0


def test_load_image_dicom_window_and_monochrome1_inversion(tmp_path):
    ramp = np.tile(np.arange(0, 1001, 10, dtype=np.uint16), (4, 1))  # stored values 0..1000
    # MONOCHROME2, window 250..750 honoured (values outside it saturate), then the intensity rule
    g2 = _grey(load_image(_write_dicom(tmp_path / "a.dcm", ramp, WindowCenter=500, WindowWidth=500)))[0]
    assert g2[0] == 0 and g2[20] == 0 and g2[80] == 255 and g2[-1] == 255 and abs(int(g2[50]) - 128) <= 2
    # MONOCHROME1 with rescale and a window on the rescaled values, no suffix (found by its DICM
    # magic): inverted, low values bright.
    g1 = _grey(load_image(_write_dicom(tmp_path / "b", ramp, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1000,
                                       WindowCenter=0, WindowWidth=1000)))[0]
    assert g1[0] == 255 and g1[25] == 255 and g1[75] == 0 and g1[-1] == 0 and abs(int(g1[50]) - 128) <= 2
    assert np.all(np.diff(g1.astype(int)) <= 0)
    g3 = _grey(load_image(_write_dicom(tmp_path / "c.dcm", ramp, "MONOCHROME1", RescaleSlope=2,
                                       RescaleIntercept=-1000)))[0]
    assert g3[0] == 255 and g3[-1] == 0


def test_load_image_multiframe_dicom_uses_first_frame(tmp_path):
    frames = np.stack([np.full((8, 8), 100, np.uint16), np.full((8, 8), 900, np.uint16)])
    frames[0, 0, 0] = 0  # so the first frame is not flat
    grey = _grey(load_image(_write_dicom(tmp_path / "multi.dcm", frames)))
    assert grey[0, 0] == 0 and grey[1, 1] == 255


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="missing.png: file not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.png: empty file"):
        load_image(tmp_path / "empty.png")
    data = _jpeg_bytes()
    (tmp_path / "half.jpeg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="half.jpeg: truncated"):
        load_image(tmp_path / "half.jpeg")


@pytest.mark.skipif(not RAW_SAMPLES.is_dir(), reason=f"real data not found at {RAW_SAMPLES}")
def test_load_image_real_full_size_grayscale():
    path = sorted((RAW_SAMPLES / "NORMAL").glob("*.jpeg"))[0]
    full = load_image(path)
    fast = load_image(path, size_hint=224)
    assert full.mode == fast.mode == "RGB"
    assert min(fast.size) >= 224 and fast.size[0] <= full.size[0]
    assert resize_image(fast, 224, False).shape == (3, 224, 224)


# ----------------------------------------------------------------------------------------------
# scan_folder
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def messy_train(tmp_path) -> Path:
    root = tmp_path / "data" / "train"
    normal, pneu = root / "NORMAL", root / "PNEUMONIA"
    _save(Image.fromarray(np.dstack([_gradient()] * 3)).convert("RGB"), normal / "IM-0001-0001.png")
    _save(Image.fromarray(_gradient()), normal / "IM-0002-0001.png")
    _save(Image.fromarray(_gradient().astype(np.uint16) * 250), normal / "IM-0003-0001.png")
    _write_dicom(normal / "IM-0004-0001.dcm", _gradient().astype(np.uint16) * 16, WindowCenter=2000, WindowWidth=3000)
    (normal / "IM-0005-0001.png").write_bytes(b"")
    (normal / "README.txt").write_text("not an image")
    (normal / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (pneu / "sub").mkdir(parents=True)
    (pneu / "person1_bacteria_1.jpeg").write_bytes(_jpeg_bytes(1))
    _write_dicom(pneu / "person2_bacteria_2", _gradient().astype(np.uint16), "MONOCHROME1",
                 RescaleSlope=2, RescaleIntercept=-100)
    data = _jpeg_bytes(3)
    (pneu / "person3_bacteria_3.jpeg").write_bytes(data[: len(data) // 2])
    (pneu / "person4_bacteria_4.png").write_text("this is a text file, not a PNG\n" * 10)
    (pneu / "sub" / "person5_virus_5.jpg").write_bytes(_jpeg_bytes(5))
    return root


def test_scan_skips_exactly_the_bad_files(messy_train):
    result = scan_folder(messy_train)
    assert result.class_names == ["NORMAL", "PNEUMONIA"]
    reasons = {p.name: r for p, r in result.skipped}
    assert set(reasons) == {"IM-0005-0001.png", "person3_bacteria_3.jpeg", "person4_bacteria_4.png"}
    assert "empty" in reasons["IM-0005-0001.png"]
    assert "truncated" in reasons["person3_bacteria_3.jpeg"]
    assert "not an image" in reasons["person4_bacteria_4.png"]
    assert result.ignored == 2  # README.txt and .DS_Store: counted, not errors
    names = [s.path.name for s in result.samples]
    assert names == sorted(names[:4]) + ["person1_bacteria_1.jpeg", "person2_bacteria_2", "person5_virus_5.jpg"]
    assert class_counts(result.samples, 2) == [4, 3]
    assert {s.group for s in result.samples} == {"IM-0001", "IM-0002", "IM-0003", "IM-0004", "person1", "person2",
                                                 "person5"}
    for s in result.samples:  # every sample the scan keeps can be loaded
        assert load_image(s.path).mode == "RGB"


def test_scan_strict_raises_listing_every_bad_file(messy_train):
    with pytest.raises(ImageReadError) as info:
        scan_folder(messy_train, strict=True)
    text = str(info.value)
    assert "3 unreadable" in text
    for name in ("IM-0005-0001.png", "person3_bacteria_3.jpeg", "person4_bacteria_4.png"):
        assert name in text


def test_scan_without_verify_only_drops_empty_files(messy_train):
    result = scan_folder(messy_train, verify=False)
    assert [p.name for p, _ in result.skipped] == ["IM-0005-0001.png"]
    assert len(result.samples) == 9


def test_byte_identical_files_share_a_group(tmp_path):
    root = _two_class(tmp_path / "train")
    shutil.copyfile(root / "NORMAL" / "IM-0001-0001.png", root / "NORMAL" / "IM-0077-0001.png")
    shutil.copyfile(root / "NORMAL" / "IM-0001-0001.png", root / "NORMAL" / "copy_without_patient.png")
    groups = {s.path.name: s.group for s in scan_folder(root).samples}
    assert groups["IM-0001-0001.png"] == groups["IM-0077-0001.png"] == groups["copy_without_patient.png"]
    assert groups["IM-0002-0001.png"] != groups["IM-0001-0001.png"]
    separate = {s.path.name: s.group for s in scan_folder(root, hash_groups=False).samples}
    assert separate["IM-0001-0001.png"] != separate["IM-0077-0001.png"]


def test_scan_test_folder_uses_train_classes(tmp_path, caplog):
    test = tmp_path / "test"
    _save(Image.fromarray(_gradient()), test / "PNEUMONIA" / "person9_virus_9.png")
    with caplog.at_level(logging.WARNING, logger="chexformer.data"):
        result = scan_folder(test, ["NORMAL", "PNEUMONIA"])
    assert [s.label for s in result.samples] == [1]
    assert result.extra["missing_classes"] == ["NORMAL"]
    assert any("no folder for class" in r.getMessage() for r in caplog.records)
    _save(Image.fromarray(_gradient()), test / "COVID" / "x.png")
    with pytest.raises(DatasetLayoutError, match="unknown class folder"):
        scan_folder(test, ["NORMAL", "PNEUMONIA"])


def _layout_cases(tmp_path: Path) -> dict[str, Path]:
    empty = _two_class(tmp_path / "empty" / "train")
    for f in (empty / "NORMAL").iterdir():
        f.unlink()
    (empty / "NORMAL" / "notes.txt").write_text("no images here")
    unreadable = _two_class(tmp_path / "unreadable" / "train")
    for f in (unreadable / "NORMAL").iterdir():
        f.write_bytes(b"")
    one = tmp_path / "one" / "train"
    _save(Image.fromarray(_gradient()), one / "NORMAL" / "IM-0001-0001.png")
    flat = tmp_path / "flat" / "train"
    _save(Image.fromarray(_gradient()), flat / "IM-0001-0001.png")
    afile = tmp_path / "afile"
    afile.write_text("x")
    return {"empty": empty, "unreadable": unreadable, "one": one, "flat": flat, "missing": tmp_path / "nope",
            "file": afile}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "empty class folder: train/NORMAL has no images"),
        ("unreadable", "empty class folder: train/NORMAL has no readable images"),
        ("one", "one class found"),
        ("flat", "no class sub-folders"),
        ("missing", "data folder not found"),
        ("file", "not a folder"),
    ],
)
def test_layout_errors_show_the_expected_layout(tmp_path, case, message):
    with pytest.raises(DatasetLayoutError) as info:
        scan_folder(_layout_cases(tmp_path)[case])
    text = str(info.value)
    assert message in text
    assert LAYOUT_LINE in text and "val/<CLASS_A>/" in text


def test_image_extensions_cover_common_formats():
    assert {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp"} <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------------------------
# split_by_patient
# ----------------------------------------------------------------------------------------------
def _grouped_samples(seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for label, n_groups in ((0, 60), (1, 90)):
        for g in range(n_groups):
            for k in range(int(rng.integers(1, 5))):
                samples.append(Sample(Path(f"c{label}/g{g}_{k}.png"), label, f"c{label}-g{g}"))
    samples.append(Sample(Path("c0/shared.png"), 0, "c1-g0"))  # a group with both classes
    return samples


@pytest.mark.parametrize("fraction", [0.2, 0.3])
def test_split_by_patient_keeps_groups_apart_and_stratifies(fraction):
    samples = _grouped_samples()
    train, val = split_by_patient(samples, fraction, seed=7)
    assert len(train) + len(val) == len(samples)
    assert not {s.group for s in train} & {s.group for s in val}
    for label in (0, 1):
        n_val = sum(s.label == label for s in val)
        n_all = sum(s.label == label for s in samples)
        assert 0 < n_val < n_all
        assert abs(n_val / n_all - fraction) < 0.03
    again = split_by_patient(samples, fraction, seed=7)
    assert [s.path for s in again[1]] == [s.path for s in val]
    other = split_by_patient(samples, fraction, seed=8)
    assert [s.path for s in other[1]] != [s.path for s in val]


def test_split_by_patient_needs_two_groups_per_class():
    samples = [Sample(Path(f"{k}.png"), 0, f"g{k}") for k in range(5)] + [Sample(Path("x.png"), 1, "one")]
    with pytest.raises(ValueError, match="fewer than 2 patient groups"):
        split_by_patient(samples, 0.2, seed=0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_by_patient(samples, 1.0, seed=0)


def test_write_split_csv_and_describe(tmp_path):
    samples = _grouped_samples()
    train, val = split_by_patient(samples, 0.2, seed=0)
    write_split_csv(tmp_path / "out" / "split.csv", train, val, samples[:3], ["NORMAL", "PNEUMONIA"])
    lines = (tmp_path / "out" / "split.csv").read_text().splitlines()
    assert lines[0] == "path,label,class_name,patient,split"
    assert len(lines) == 1 + len(samples) + 3
    assert lines[-1].endswith(",test") and ",NORMAL," in lines[1] + lines[-1]
    # read back: each side's paths, labels and patients, in order (digests are not written)
    for side, part in (("train", train), ("val", val), ("test", samples[:3])):
        back = read_split_csv(tmp_path / "out" / "split.csv", side)
        assert [(s.path, s.label, s.group) for s in back] == [(s.path, s.label, s.group) for s in part], side
    info = describe(samples, ["NORMAL", "PNEUMONIA"])
    assert info["images"] == len(samples) and info["patients"] == 150
    assert sum(info["per_class"].values()) == len(samples)


@pytest.mark.skipif(not KERMANY_TRAIN.is_dir(), reason=f"real data not found at {KERMANY_TRAIN}")
def test_real_kermany_scan_and_patient_split():
    result = scan_folder(KERMANY_TRAIN, verify=True)
    assert result.class_names == ["NORMAL", "PNEUMONIA"]
    assert class_counts(result.samples, 2) == [1341, 3875]
    assert result.skipped == [] and result.extra["unmatched_names"] == 0
    train, val = split_by_patient(result.samples, 0.2, seed=42)
    side = {s.path: "val" for s in val} | {s.path: "train" for s in train}
    assert not {s.group for s in train} & {s.group for s in val}
    for label in (0, 1):
        frac = sum(s.label == label for s in val) / sum(s.label == label for s in result.samples)
        assert abs(frac - 0.2) < 0.02
    # Patients by name never straddle the split ...
    patients: dict[str, set[str]] = {}
    for s in result.samples:
        patients.setdefault(patient_id(s.path), set()).add(side[s.path])
    assert all(len(sides) == 1 for sides in patients.values())
    # ... and neither do byte-identical files (hashed independently here).
    by_hash: dict[str, list[Sample]] = {}
    for s in result.samples:
        by_hash.setdefault(hashlib.sha1(s.path.read_bytes()).hexdigest(), []).append(s)
    duplicates = [group for group in by_hash.values() if len(group) > 1]
    assert duplicates, "the Kermany training set is known to contain byte-identical files"
    for group in duplicates:
        assert len({s.group for s in group}) == 1
        assert len({side[s.path] for s in group}) == 1


# ----------------------------------------------------------------------------------------------
# XrayDataset, resize, transforms
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def synthetic_samples(tmp_path) -> list[Sample]:
    root = make_synthetic_dataset(tmp_path / "synth", n_per_class=6, img_size=72, seed=3, splits=("train",))
    samples = scan_folder(root / "train").samples
    colour = np.dstack([_gradient(50, 60), _gradient(50, 60)[::-1], np.full((50, 60), 90, np.uint8)])
    path = _save(Image.fromarray(colour), tmp_path / "synth" / "colour" / "IM-0999-0001.png")
    return samples + [Sample(path, 0, "IM-0999")]


def test_dataset_shapes_and_preload_equality(synthetic_samples):
    plain = XrayDataset(synthetic_samples, 64)
    stored = XrayDataset(synthetic_samples, 64, preload=True, num_preload_workers=2)
    assert len(plain) == len(stored) == len(synthetic_samples) and stored.preloaded
    for i in range(len(plain)):
        u = plain.uint8(i)
        assert u.dtype == torch.uint8 and u.shape == (3, 64, 64)
        assert torch.equal(u, stored.uint8(i))
    x, label, index = plain[3]
    assert x.dtype == torch.float32 and x.shape == (3, 64, 64) and 0.0 <= x.min() and x.max() <= 1.0
    assert label == synthetic_samples[3].label and index == 3
    assert torch.equal(x, stored[3][0])
    assert plain.failed == [] and stored.failed == []
    # The store is not altered through what it hands out.
    stored.uint8(0).zero_()
    assert torch.equal(stored.uint8(0), plain.uint8(0))


def test_resize_keep_aspect_pads_with_black():
    img = Image.new("RGB", (100, 50), (200, 200, 200))
    padded = resize_image(img, 64, keep_aspect=True)
    assert padded.shape == (3, 64, 64) and padded.dtype == torch.uint8
    assert padded[:, 0].max() == 0 and padded[:, -1].max() == 0 and padded[:, 32].min() == 200
    stretched = resize_image(img, 64, keep_aspect=False)
    assert stretched.min() == 200


@pytest.mark.parametrize("preload", [False, True])
def test_dataset_survives_a_file_deleted_after_the_scan(synthetic_samples, caplog, preload):
    samples = synthetic_samples[:-1]
    victim = 0
    expected = XrayDataset(samples, 32).uint8(next(j for j in range(1, len(samples))
                                                   if samples[j].label == samples[victim].label))
    samples[victim].path.unlink()
    with caplog.at_level(logging.WARNING, logger="chexformer.data"):
        ds = XrayDataset(samples, 32, preload=preload)
        x, label, index = ds[victim]
        ds[victim]
    assert x.shape == (3, 32, 32) and label == samples[victim].label and index == victim
    assert torch.equal(ds.uint8(victim), expected)  # the next readable image of the same class
    assert [p for p, _ in ds.failed] == [samples[victim].path] and "not found" in ds.failed[0][1]
    assert ds.failed_indices == {victim}
    assert sum("cannot read" in r.getMessage() for r in caplog.records) == 1


def test_build_transforms_contracts():
    cfg = Config(img_size=64)
    img = torch.from_numpy(np.dstack([_gradient(64, 64)] * 3)).permute(2, 0, 1).contiguous()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    evaluate = build_transforms(cfg, train=False, mean=mean, std=std)
    a, b = evaluate(img), evaluate(img)
    assert a.dtype == torch.float32 and a.shape == (3, 64, 64) and torch.equal(a, b)
    ruled = torch.from_numpy(standardize_intensity(img[0].numpy())).expand(3, -1, -1)  # the intensity rule again
    manual = (ruled.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(a, manual, atol=1e-5)
    train = build_transforms(cfg, train=True, mean=mean, std=std)
    torch.manual_seed(0)
    outs = [train(img) for _ in range(3)]
    assert all(o.dtype == torch.float32 and o.shape == (3, 64, 64) for o in outs)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    names = " ".join(type(t).__name__ for t in train.transforms)
    assert "Flip" not in names and "Crop" not in names
    no_aug = build_transforms(cfg.replace(augment=False), train=True, mean=0.5, std=0.25)
    assert torch.equal(no_aug(img), no_aug(img))
    acq = build_transforms(cfg.replace(acquisition_aug=1.0), train=True, mean=mean, std=std)
    assert "RandomAcquisition" in " ".join(type(t).__name__ for t in acq.transforms)
    assert acq(img).shape == (3, 64, 64)
    erase = build_transforms(cfg.replace(random_erasing=1.0, rotation_deg=0.0, translate=0.0, scale_min=1.0,
                                         scale_max=1.0, brightness=0.0, contrast=0.0), train=True, mean=mean, std=std)
    torch.manual_seed(1)
    erased = erase(img)
    hole = (erased == 0).all(dim=0)  # erased pixels are the mean (0 after Normalize) in every channel
    assert 0.02 * 64 * 64 * 0.5 <= hole.sum() <= 0.34 * 64 * 64  # an erased area of 2-33 % (with rounding slack)
    assert torch.equal(erased[:, ~hole], evaluate(img)[:, ~hole])  # the rest is the image, untouched
    evaluation = build_transforms(cfg.replace(random_erasing=1.0), train=False, mean=mean, std=std)
    assert "RandomErasing" not in " ".join(type(t).__name__ for t in evaluation.transforms)
    with pytest.raises(ValueError, match="random_erasing"):
        cfg.replace(random_erasing=1.5)
    # edge occlusion: bands along the edges set to the image's mean grey (before the intensity rule),
    # the middle left as it was; never at evaluation
    still = dict(rotation_deg=0.0, translate=0.0, scale_min=1.0, scale_max=1.0, brightness=0.0, contrast=0.0)
    hide = build_transforms(cfg.replace(edge_occlusion=1.0, edge_occlusion_max=0.25, **still), train=True,
                            mean=mean, std=std)
    assert "RandomEdgeOcclusion" in " ".join(type(t).__name__ for t in hide.transforms)
    torch.manual_seed(2)
    hidden = hide(img)
    flat_rows = [bool((hidden[:, r] == hidden[:, r, :1]).all()) for r in range(64)]  # per channel (Normalize)
    flat_cols = [bool((hidden[:, :, c] == hidden[:, :1, c]).all()) for c in range(64)]
    assert flat_rows[0] and flat_cols[0] and flat_rows[-1] and flat_cols[-1]  # four bands (seed 2: none empty)
    # no band is wider than 0.25 x 64 = 16 px: the middle rows and columns keep the gradient
    assert not any(flat_rows[16:48]) and not any(flat_cols[16:48])
    evaluation = build_transforms(cfg.replace(edge_occlusion=1.0), train=False, mean=mean, std=std)
    assert "RandomEdgeOcclusion" not in " ".join(type(t).__name__ for t in evaluation.transforms)
    for bad in ({"edge_occlusion": 1.5}, {"edge_occlusion_max": 0.5}, {"edge_occlusion_max": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cfg.replace(**bad)
    # region blur: one rectangle blurred at a coarse scale before the intensity rule, the rest as it
    # was (up to the rule's re-stretch); never at evaluation
    texture = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    noisy = texture.expand(3, 64, 64).contiguous()
    region = shifts.RandomRegionBlur(p=1.0)
    torch.manual_seed(3)
    out = region(noisy)
    changed = (out != noisy).any(dim=0)
    rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 64 * 64 * 0.8 <= box <= 0.34 * 64 * 64  # one rectangle of 2-33 %
    inside = out[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1].float()
    assert inside.std() < 0.25 * texture.float().std()  # coarse blur: the noise is (nearly) gone
    assert abs(inside.mean() - texture.float().mean()) < 12  # and the region keeps its brightness
    assert torch.equal(out[:, ~changed], noisy[:, ~changed]) and torch.equal(out[0], out[2])
    assert torch.equal(shifts.RandomRegionBlur(p=0.0)(noisy), noisy)
    with_blur = build_transforms(cfg.replace(region_blur=0.5), train=True, mean=mean, std=std)
    assert "RandomRegionBlur" in " ".join(type(t).__name__ for t in with_blur.transforms)
    evaluation = build_transforms(cfg.replace(region_blur=1.0), train=False, mean=mean, std=std)
    assert "RandomRegionBlur" not in " ".join(type(t).__name__ for t in evaluation.transforms)
    with pytest.raises(ValueError, match="region_blur"):
        cfg.replace(region_blur=1.5)
    # where="top_bottom_centre": a band across the middle half of the width at the top or the bottom,
    # 8-25 % of the height deep, blurred; the lung fields (the middle rows) and the sides never change
    band = shifts.RandomRegionBlur(p=1.0, where="top_bottom_centre")
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = band(noisy)
        changed = (out != noisy).any(dim=0)
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        assert cols.min() >= 16 and cols.max() < 48 and cols.max() - cols.min() >= 28  # the middle half
        edge = "top" if rows.min() == 0 else "bottom"
        assert rows.max() == 63 if edge == "bottom" else rows.max() < 16  # a band along one edge only
        assert 5 <= rows.max() - rows.min() + 1 <= 16  # 8-25 % of 64 rows deep
        assert out[0, rows.min():rows.max() + 1, 18:46].float().std() < 0.25 * texture.float().std()
        seen.add(edge)
    assert seen == {"top", "bottom"}
    with_band = build_transforms(cfg.replace(region_blur=0.5, region_blur_where="top_bottom_centre"), train=True,
                                 mean=mean, std=std)
    assert [t.where for t in with_band.transforms if type(t).__name__ == "RandomRegionBlur"] == ["top_bottom_centre"]
    with pytest.raises(ValueError, match="region_blur_where"):
        cfg.replace(region_blur_where="lungs")
    # the config's choices and the transform's are one list: a value added to one alone fails here
    assert typing.get_args(typing.get_type_hints(Config)["region_blur_where"]) == shifts.RandomRegionBlur.WHERE
    # pad_fill: what the training affine uncovers is filled with one random grey level per image
    pads = [t for t in build_transforms(cfg.replace(pad_fill="random"), train=True, mean=mean, std=std).transforms
            if type(t).__name__ == "RandomAffinePad"]
    assert len(pads) == 1 and pads[0].fill == "random"
    with pytest.raises(ValueError, match="pad_fill"):
        cfg.replace(pad_fill="white")


# ----------------------------------------------------------------------------------------------
# Synthetic data
# ----------------------------------------------------------------------------------------------
def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_dataset_is_deterministic_and_scans_cleanly(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n_per_class=12, img_size=64, seed=5)
    b = make_synthetic_dataset(tmp_path / "b", n_per_class=12, img_size=64, seed=5)
    c = make_synthetic_dataset(tmp_path / "c", n_per_class=12, img_size=64, seed=6)
    assert _tree_bytes(a) == _tree_bytes(b)
    assert _tree_bytes(a) != _tree_bytes(c)
    train = scan_folder(a / "train", strict=True)
    test = scan_folder(a / "test", train.class_names, strict=True)
    assert train.class_names == ["NORMAL", "PNEUMONIA"]
    assert class_counts(train.samples, 2) == [9, 9] and class_counts(test.samples, 2) == [3, 3]
    assert train.ignored == 0 and train.extra["unmatched_names"] == 0
    assert not {s.group for s in train.samples} & {s.group for s in test.samples}
    for s in train.samples:
        assert Image.open(s.path).size == (64, 64)


def test_synthetic_image_opacity_at_a_known_place():
    rng = np.random.default_rng(0)
    img, mask = synthetic_image(rng, 64, opacity=False)
    assert img.dtype == np.uint8 and img.shape == (64, 64) and not mask.any()
    img, mask = synthetic_image(rng, 64, opacity=True, opacity_center=(0.45, 0.3))
    assert mask.dtype == bool and mask.shape == (64, 64) and mask.any()
    ys, xs = np.nonzero(mask)
    assert abs(ys.mean() / 64 - 0.45) < 0.08 and abs(xs.mean() / 64 - 0.3) < 0.08
    with pytest.raises(ValueError):
        synthetic_image(rng, 64, opacity=False, opacity_center=(0.5, 0.5))
