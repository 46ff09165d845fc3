"""Data: image files on disk -> patient-grouped samples -> model-input tensors.

The stages, in the order data flows through them:

* :mod:`~chexformer.data.io`: decode any file (Pillow, DICOM) -> the intensity rule -> 8-bit grey;
* :mod:`~chexformer.data.scan`: walk class folders, patient ids, duplicates, patient-grouped splits;
* :mod:`~chexformer.data.datasets`: resize, augmentation transforms, :class:`XrayDataset`;
* :mod:`~chexformer.data.datamodule`: the LightningDataModule of a training run (imports Lightning,
  so it is not imported here);
* :mod:`~chexformer.data.cache`: backbone feature maps computed once for the frozen-backbone path.

The names below are re-exported so that ``from chexformer.data import load_image`` works.
"""

from chexformer.data.datasets import XrayDataset, build_transforms, resize_image
from chexformer.data.io import (
    DICOM_EXTENSIONS,
    INTENSITY_PERCENTILES,
    ImageReadError,
    load_image,
    standardize_intensity,
)
from chexformer.data.scan import (
    EVAL_LAYOUT,
    IMAGE_EXTENSIONS,
    LAYOUT,
    DatasetLayoutError,
    PatientOverlapError,
    Sample,
    ScanResult,
    class_counts,
    describe,
    find_images,
    patient_id,
    read_split_csv,
    scan_folder,
    shared_patients,
    split_by_patient,
    write_split_csv,
)

__all__ = [
    "DICOM_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "INTENSITY_PERCENTILES",
    "LAYOUT",
    "EVAL_LAYOUT",
    "DatasetLayoutError",
    "ImageReadError",
    "PatientOverlapError",
    "Sample",
    "ScanResult",
    "XrayDataset",
    "build_transforms",
    "class_counts",
    "describe",
    "find_images",
    "load_image",
    "patient_id",
    "resize_image",
    "scan_folder",
    "shared_patients",
    "split_by_patient",
    "standardize_intensity",
    "read_split_csv",
    "write_split_csv",
]
