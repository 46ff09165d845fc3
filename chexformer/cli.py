"""Command-line entry point: ``chexformer <command>`` and ``python -m chexformer <command>``."""

from __future__ import annotations

import argparse
import logging
import sys

from chexformer import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chexformer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"chexformer {__version__}")
    parser.parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
