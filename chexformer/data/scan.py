"""Walk class folders into patient-grouped samples and split them by patient.

In: a data folder laid out as :data:`LAYOUT` (one sub-folder per class under ``train/``,
optional ``val/`` and ``test/`` with the same class names). Out: :class:`Sample` lists (path,
label, patient group, content digest) for :mod:`chexformer.data.datamodule` and evaluation,
and ``split.csv`` in the run folder.

* :func:`scan_folder` finds the images, verifies each one in a thread pool (decoding through
  :mod:`chexformer.data.io`), and groups them by patient: the patient id in the file name (Kermany
  names by default) joined, union-find style, with byte-identical copies of the same file.
  Unreadable files are skipped and listed, or raise with ``strict=True``; layout mistakes raise
  :class:`DatasetLayoutError` with the layout diagram.
* :func:`split_by_patient` holds out a validation set stratified by class with no patient group on
  both sides, so images of one patient (Kermany has many) cannot leak from training into validation;
  :func:`shared_patients` finds patients that appear in more than one split anyway.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from chexformer.config import DEFAULT_PATIENT_REGEX
from chexformer.data.io import ImageReadError, decode, has_dicom_magic, read_bytes

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUT",
    "EVAL_LAYOUT",
    "DatasetLayoutError",
    "PatientOverlapError",
    "Sample",
    "ScanResult",
    "class_counts",
    "describe",
    "find_images",
    "patient_id",
    "scan_folder",
    "shared_patients",
    "split_by_patient",
    "read_split_csv",
    "write_split_csv",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff", ".gif", ".webp",
    ".pgm", ".ppm", ".pbm", ".pnm", ".dcm", ".dicom",
})
"""Lower-case suffixes scanned as images. Files with no suffix, or a numeric one (DICOM exports
named by UID, ``1.2.840.113619.2.55.3``), are scanned too when they carry the DICOM magic."""

LAYOUT = """expected layout:
  DATA_DIR/
    train/<CLASS_A>/*.png|jpg|dcm ...
    train/<CLASS_B>/...
    test/<CLASS_A>/...   (optional)
    val/<CLASS_A>/...    (optional; used as-is instead of a split)"""


class PatientOverlapError(ValueError):
    """The same patient (or a byte-identical file) is in more than one of train/val/test."""


EVAL_LAYOUT = """expected layout (one labelled folder, e.g. DATA_DIR/test):
  FOLDER/
    <CLASS_A>/*.png|jpg|dcm ...   (the checkpoint's class names)
    <CLASS_B>/..."""


class DatasetLayoutError(ValueError):
    """The data folder does not have the expected layout; the message ends with ``layout``
    (:data:`LAYOUT`, the training layout, unless the caller names another)."""

    def __init__(self, message: str, layout: str = LAYOUT) -> None:
        super().__init__(message)
        self.layout = layout

    def __str__(self) -> str:
        return f"{self.args[0]}\n{self.layout}"


# ----------------------------------------------------------------------------------------------
# Patients and folders
# ----------------------------------------------------------------------------------------------
def patient_id(path: str | os.PathLike, regex: str = DEFAULT_PATIENT_REGEX) -> str | None:
    """Patient id in a file *name*: the first non-empty group of ``re.search``, else the whole
    match; ``None`` when nothing matches. ``person1234_bacteria_5678.jpeg`` -> ``person1234``,
    ``NORMAL2-IM-0115-0001.jpeg`` -> ``IM-0115``."""
    match = re.search(regex, Path(path).name)
    if match is None:
        return None
    for group in match.groups():
        if group:
            return group
    return match.group(0) or None


@dataclass
class Sample:
    path: Path
    label: int
    group: str
    """Patient id, or a fallback id shared with byte-identical files; never on both split sides."""
    digest: str | None = None
    """blake2b-128 of the file's bytes, from the scan (None when the scan did not hash)."""


@dataclass
class ScanResult:
    samples: list[Sample]
    class_names: list[str]
    skipped: list[tuple[Path, str]]
    """Image files left out, with the reason (unreadable, or outside any class folder)."""
    ignored: int
    """Files that are not images by name (README.txt, .DS_Store, ...): counted, not errors."""
    elapsed_s: float = 0.0
    extra: dict = field(default_factory=dict)
    """``missing_classes``, ``unmatched_names``, ``duplicate_files``: numbers for a run summary."""


def _hidden(name: str) -> bool:
    return name.startswith((".", "__"))  # .git, .ipynb_checkpoints, __MACOSX, ._IM-0001.jpeg


def _candidate_kind(path: Path) -> str | None:
    """'image' by suffix, 'probe' when only the DICOM magic can tell, None to ignore."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix == "" or suffix[1:].isdigit():
        return "probe"
    return None


def _walk_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        files.extend(Path(dirpath) / f for f in filenames)
    return sorted(files)


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image and DICOM files under ``folder`` (recursively, sorted), by the scan's rules: known
    image suffixes, plus files without a suffix (or a numeric one) that carry the DICOM magic.
    Nothing is decoded."""
    found = []
    for path in _walk_files(Path(folder)):
        kind = None if _hidden(path.name) else _candidate_kind(path)
        if kind == "image":
            found.append(path)
        elif kind == "probe":
            try:
                with path.open("rb") as f:
                    if has_dicom_magic(f.read(132)):
                        found.append(path)
            except OSError:
                pass
    return found


@dataclass
class _Inspection:
    kind: str  # "image", "not_image", "bad"
    digest: str | None = None
    reason: str | None = None


def _inspect(path: Path, kind: str, verify: bool, hash_groups: bool) -> _Inspection:
    if kind == "image" and not (verify or hash_groups):
        try:
            size = path.stat().st_size
        except OSError as exc:
            return _Inspection("bad", reason=f"cannot read file: {exc.strerror or exc}")
        return _Inspection("image") if size else _Inspection("bad", reason="empty file (0 bytes)")
    try:
        data = read_bytes(path)
    except ImageReadError as exc:
        return _Inspection("bad", reason=exc.reason)
    if kind == "probe" and not has_dicom_magic(data):
        return _Inspection("not_image")
    digest = hashlib.blake2b(data, digest_size=16).hexdigest() if hash_groups else None
    if verify:
        try:
            decode(data, path, verify_only=True)
        except ImageReadError as exc:
            return _Inspection("bad", digest, exc.reason)
    return _Inspection("image", digest)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _default_workers() -> int:
    return max(2, min(16, 2 * (os.cpu_count() or 1)))


def _show(paths: Sequence, limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def scan_folder(
    root: str | os.PathLike,
    class_names: list[str] | None = None,
    *,
    strict: bool = False,
    verify: bool = True,
    patient_regex: str = DEFAULT_PATIENT_REGEX,
    hash_groups: bool = True,
    num_workers: int | None = None,
) -> ScanResult:
    """Find, check and group the images under ``root`` (e.g. ``DATA/train``).

    Class names are the sorted sub-folder names (hidden ones and ``__MACOSX`` ignored), or
    ``class_names`` (for ``test/`` and ``val/``: the training classes; a missing or empty class
    folder there only warns, an unknown one is an error). Class folders are walked recursively in
    sorted order. With ``verify`` every image is decoded (JPEG at reduced scale) in a thread pool of
    ``num_workers`` threads; unreadable files are skipped with their reason, or raise
    :class:`ImageReadError` listing all of them when ``strict``.

    Groups: the patient id from ``patient_regex`` where the file name matches; files with identical
    bytes (blake2b of the content, when ``hash_groups``) are joined into one group together with all
    their patients. Other files form a group each, with one warning counting them.

    Raises:
        DatasetLayoutError: root missing or not a folder, no class sub-folders, fewer than two
            classes, an unknown class folder, a class folder without a readable image.
        ImageReadError: ``strict`` and at least one unreadable image.
    """
    start = time.perf_counter()
    root = Path(root)
    if not root.exists():
        raise DatasetLayoutError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DatasetLayoutError(f"not a folder: {root}")
    re.compile(patient_regex)

    entries = sorted(root.iterdir())
    folders = [p.name for p in entries if p.is_dir() and not _hidden(p.name)]
    loose = [p for p in entries if p.is_file() and not _hidden(p.name) and _candidate_kind(p) == "image"]
    if not folders:
        detail = ""
        if loose:
            detail = f"; {len(loose)} image file(s) lie directly in it ({_show([p.name for p in loose], 3)})"
        raise DatasetLayoutError(
            f"no class sub-folders in {root}{detail}: put each class's images in its own sub-folder"
        )

    given = class_names is not None
    if given:
        class_names = list(class_names)
        unknown = sorted(set(folders) - set(class_names))
        if unknown:
            raise DatasetLayoutError(
                f"unknown class folder(s) in {root}: {', '.join(unknown)}; the classes are those of the "
                f"training folder: {', '.join(class_names)}"
            )
    else:
        class_names = sorted(folders)
        if len(class_names) < 2:
            raise DatasetLayoutError(
                f"one class found in {root} ({', '.join(class_names)}); need at least two class sub-folders"
            )

    # Collect candidates; everything else is counted as ignored.
    ignored = sum(1 for p in entries if p.is_file() and p not in loose)
    skipped: list[tuple[Path, str]] = [(p, "image outside any class folder") for p in loose]
    if loose:
        log.warning("%s: %d image file(s) directly in the folder, outside any class folder, are left out: %s",
                    root, len(loose), _show([p.name for p in loose], 3))
    jobs: list[tuple[Path, int, str]] = []
    missing = []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            missing.append(name)
            continue
        for path in _walk_files(folder):
            kind = None if _hidden(path.name) else _candidate_kind(path)
            if kind is None:
                ignored += 1
            else:
                jobs.append((path, label, kind))

    workers = num_workers or _default_workers()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        inspections = list(pool.map(lambda job: _inspect(job[0], job[2], verify, hash_groups), jobs))

    bad: list[tuple[Path, str]] = []
    found: list[tuple[Path, int, str | None]] = []
    for (path, label, _), result in zip(jobs, inspections):
        if result.kind == "not_image":
            ignored += 1
        elif result.kind == "bad":
            bad.append((path, result.reason))
        else:
            found.append((path, label, result.digest))
    if bad:
        listing = "\n".join(f"  {p}: {r}" for p, r in bad)
        if strict:
            raise ImageReadError(root, f"{len(bad)} unreadable image file(s) (strict=True):\n{listing}")
        log.warning("%s: skipping %d unreadable image file(s):\n%s", root, len(bad), listing)
    skipped.extend(bad)

    per_class = [0] * len(class_names)
    for _, label, _ in found:
        per_class[label] += 1
    empty = [name for name, n in zip(class_names, per_class) if n == 0 and name not in missing]
    bad_names = {}
    for p, r in bad:
        rel = p.relative_to(root).parts[0]
        bad_names.setdefault(rel, []).append(f"{p.name} ({r})")
    if given:
        if missing:
            log.warning("%s: no folder for class(es) %s", root, ", ".join(missing))
        if empty:
            log.warning("%s: class folder(s) without readable images: %s", root, ", ".join(empty))
        if not found:
            raise DatasetLayoutError(f"no readable images in {root}")
    elif empty:
        details = "; ".join(
            f"empty class folder: {root.name}/{name} has no {'readable ' if name in bad_names else ''}images"
            + (f" (unreadable: {_show(bad_names[name], 3)})" if name in bad_names else "")
            for name in empty
        )
        raise DatasetLayoutError(details)

    samples, unmatched, duplicates = _group(found, root, patient_regex)
    if unmatched:
        log.warning(
            "%s: %d of %d file name(s) do not match patient_regex %r; each of them is its own group, so their "
            "patients cannot be kept on one side of the split (e.g. %s)",
            root, len(unmatched), len(found), patient_regex, _show(unmatched, 3),
        )
    elapsed = time.perf_counter() - start
    log.info(
        "%s: %d images (%s) in %d groups, %d skipped, %d non-image files ignored, in %.1f s (%d threads%s)",
        root, len(samples), ", ".join(f"{n} {c}" for c, n in zip(class_names, per_class)),
        len({s.group for s in samples}), len(skipped), ignored, elapsed, workers, ", verified" if verify else "",
    )
    extra = {"missing_classes": missing, "unmatched_names": len(unmatched), "duplicate_files": duplicates}
    return ScanResult(samples, class_names, skipped, ignored, elapsed, extra)


def _group(
    found: list[tuple[Path, int, str | None]], root: Path, patient_regex: str
) -> tuple[list[Sample], list[str], int]:
    """Union-find of patient ids and content hashes; returns samples, unmatched names, and the
    number of files that have a byte-identical twin."""
    uf = _UnionFind()
    nodes = []
    unmatched = []
    hash_count: dict[str, int] = {}
    for path, _, digest in found:
        pid = patient_id(path, patient_regex)
        if pid is None:
            unmatched.append(path.name)
            node = "f:" + path.relative_to(root).as_posix()
        else:
            node = "p:" + pid
        uf.find(node)
        if digest is not None:
            uf.union(node, "h:" + digest)
            hash_count[digest] = hash_count.get(digest, 0) + 1
        nodes.append(node)
    # Name each group by its smallest patient id, else by its first file.
    names: dict[str, str] = {}
    for node in sorted({n for n in nodes}):
        root_node = uf.find(node)
        label = node[2:] if node.startswith("p:") else "file:" + node[2:]
        if root_node not in names or (node.startswith("p:") and names[root_node].startswith("file:")):
            names[root_node] = label
    samples = [Sample(path, label, names[uf.find(node)], digest)
               for (path, label, digest), node in zip(found, nodes)]
    duplicates = sum(n for n in hash_count.values() if n > 1)
    return samples, unmatched, duplicates


# ----------------------------------------------------------------------------------------------
# Patient-level split
# ----------------------------------------------------------------------------------------------
def split_by_patient(
    samples: list[Sample], validation_split: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out about ``validation_split`` of every class, keeping each group on one side.

    Groups are visited in a seeded random order and moved to validation whenever that brings the
    per-class validation fractions closer to the target (squared error summed over classes); a
    second pass moves single groups either way while that still helps, and a class left without
    images on one side gets its cheapest group moved over. Unlike k-fold splitters this reaches any
    fraction, not just 1/k. Both lists keep the order of ``samples``. Deterministic for a seed.

    Raises:
        ValueError: fraction outside (0, 1), or a class with fewer than two groups.
    """
    if not 0.0 < validation_split < 1.0:
        raise ValueError(f"validation_split must lie strictly between 0 and 1, got {validation_split}")
    if not samples:
        raise ValueError("no samples to split")
    labels = sorted({s.label for s in samples})
    col = {label: k for k, label in enumerate(labels)}
    group_names = sorted({s.group for s in samples})
    gidx = {g: k for k, g in enumerate(group_names)}
    counts = np.zeros((len(group_names), len(labels)), dtype=np.int64)  # (groups, classes)
    for s in samples:
        counts[gidx[s.group], col[s.label]] += 1
    totals = counts.sum(0).astype(np.float64)
    groups_per_class = (counts > 0).sum(0)
    few = [str(labels[k]) for k in range(len(labels)) if groups_per_class[k] < 2]
    if few:
        raise ValueError(
            f"class label(s) {', '.join(few)} have fewer than 2 patient groups; a patient-level split needs at "
            "least one group on each side (add data, or provide a val/ folder)"
        )
    target = validation_split * totals

    def cost(v: np.ndarray) -> float:
        return float((((v - target) / totals) ** 2).sum())

    order = np.random.default_rng(seed).permutation(len(group_names))
    in_val = np.zeros(len(group_names), dtype=bool)
    val = np.zeros(len(labels), dtype=np.float64)
    for g in order:  # greedy fill
        if cost(val + counts[g]) < cost(val):
            in_val[g] = True
            val += counts[g]
    for _ in range(10):  # local improvement: single moves either way
        improved = False
        for g in order:
            moved = val - counts[g] if in_val[g] else val + counts[g]
            if cost(moved) < cost(val) - 1e-15:
                in_val[g] = not in_val[g]
                val = moved
                improved = True
        if not improved:
            break
    for k in range(len(labels)):  # every class on both sides
        for side in (True, False):
            have = val[k] if side else totals[k] - val[k]
            if have > 0:
                continue
            movable = [g for g in order if in_val[g] != side and counts[g, k] > 0]
            best = min(movable, key=lambda g: cost(val + counts[g] if side else val - counts[g]))
            in_val[best] = side
            val = val + counts[best] if side else val - counts[best]

    val_groups = {group_names[g] for g in np.flatnonzero(in_val)}
    train_part = [s for s in samples if s.group not in val_groups]
    val_part = [s for s in samples if s.group in val_groups]
    fractions = val / totals
    for k, frac in enumerate(fractions):
        if abs(frac - validation_split) > max(0.05, 0.25 * validation_split):
            log.warning(
                "class label %s: validation fraction %.3f, target %.3f; patient groups are too large or too few "
                "to come closer", labels[k], frac, validation_split,
            )
    log.info(
        "patient-level split (seed %d): %d train / %d validation images, %d / %d groups; validation fraction "
        "per class %s", seed, len(train_part), len(val_part), len(group_names) - len(val_groups), len(val_groups),
        ", ".join(f"{labels[k]}: {f:.3f}" for k, f in enumerate(fractions)),
    )
    return train_part, val_part


def write_split_csv(
    path: str | os.PathLike,
    train: list[Sample],
    val: list[Sample],
    test: list[Sample] | None,
    class_names: Sequence[str],
) -> None:
    """One row per image: ``path,label,class_name,patient,split`` (patient = the sample's group)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "class_name", "patient", "split"])
        for split, part in (("train", train), ("val", val), ("test", test or [])):
            for s in part:
                writer.writerow([str(s.path), s.label, class_names[s.label], s.group, split])


def read_split_csv(path: str | os.PathLike, split: str) -> list[Sample]:
    """The samples of one side (``train``, ``val`` or ``test``) of a ``split.csv`` written by
    :func:`write_split_csv`, in file order."""
    with Path(path).open(newline="") as fh:
        return [Sample(Path(r["path"]), int(r["label"]), r["patient"])
                for r in csv.DictReader(fh) if r["split"] == split]


def shared_patients(splits: dict[str, Sequence[Sample]], patient_regex: str = DEFAULT_PATIENT_REGEX,
                    limit: int = 10) -> dict[str, list[str]]:
    """Patients (ids in the file names) and byte-identical files found in more than one split.

    Returns ``{"train/test": ["person12", "file:ab12...", ...], ...}`` for every pair of splits
    that share any, at most ``limit`` examples each (sorted); empty when the splits are disjoint.
    """
    keys: dict[str, list[set[str]]] = {}
    for name, samples in splits.items():
        ids = set()
        for s in samples:
            pid = patient_id(s.path, patient_regex)
            if pid is not None:
                ids.add(pid)
            if s.digest is not None:
                ids.add("file:" + s.digest[:12])
        keys[name] = [ids]
    out: dict[str, list[str]] = {}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = keys[a][0] & keys[b][0]
            if common:
                more = [f"... {len(common) - limit} more"] if len(common) > limit else []
                out[f"{a}/{b}"] = sorted(common)[:limit] + more
    return out


def class_counts(samples: Iterable[Sample], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for s in samples:
        counts[s.label] += 1
    return counts


def describe(samples: Sequence[Sample], class_names: Sequence[str]) -> dict:
    """``{"images": n, "patients": number of groups, "per_class": {name: n}}``."""
    counts = class_counts(samples, len(class_names))
    return {
        "images": len(samples),
        "patients": len({s.group for s in samples}),
        "per_class": dict(zip(class_names, counts)),
    }


