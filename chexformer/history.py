"""history.csv: one row of training metrics per epoch; its columns, writer and reader.

Written into ``OUT/history.csv`` after every epoch by :class:`chexformer.callbacks.HistoryCSV`
(which reads it back to drop the rows of epochs a resumed run repeats); read by
:func:`chexformer.plots.plot_history` for the report and by ``bench/ablation.py``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "read_history", "write_history"]

COLUMNS = ["epoch", "train_loss", "train_acc", "train_auc", "val_loss", "val_acc", "val_auc", "lr", "threshold",
           "seconds"]


def read_history(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a history file, as dicts of strings; ``[]`` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_history(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write ``rows`` (keys among :data:`COLUMNS`) atomically: a temporary file, then a rename."""
    path = Path(path)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
