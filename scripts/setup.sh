#!/usr/bin/env bash
# Set up chexformer from nothing: a virtual environment in .venv with the package, the web service
# (app extra) and its test tools (dev extra), and Debian's Chromium for the browser tests (HTML report,
# web page; Playwright drives it, its own browser download is not needed). Idempotent: a second run
# only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[app,dev]"

if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "installing Chromium (Debian package) for the browser tests ..."
        apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "note: chromium not found; the browser tests (HTML report, web page) will be skipped" >&2
    fi
fi
