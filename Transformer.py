"""The seed's own command: ``python Transformer.py`` trains with the original defaults.

Data in ``data/`` beside this file (``data/train/<CLASS>/...``, optional ``data/val`` and
``data/test``), CheXNet weights at ``../pretrained/model.pth.tar`` or ``pretrained/model.pth.tar``
(training warns loudly and starts from random initialisation when neither exists), the run in
``runs/transformer``. Extra arguments are passed on (``python Transformer.py --epochs 5``); the
full command line is ``chexformer train --help``.
"""

import sys
from pathlib import Path

from chexformer.cli import main

HERE = Path(__file__).resolve().parent


def _pretrained() -> Path:
    for candidate in (HERE.parent / "pretrained" / "model.pth.tar", HERE / "pretrained" / "model.pth.tar"):
        if candidate.is_file():
            return candidate
    return HERE / "pretrained" / "model.pth.tar"  # missing: train() warns and uses random init


if __name__ == "__main__":
    defaults = ["--data-dir", str(HERE / "data"), "--out-dir", str(HERE / "runs" / "transformer"),
                "--pretrained-path", str(_pretrained())]
    sys.exit(main(["train", *defaults, *sys.argv[1:]]))
