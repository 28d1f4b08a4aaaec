#!/usr/bin/env bash
# Installs trl-kto-ext (editable) and its dependencies. Torch first: the CPU wheel 2.13.0 when no torch is present,
# so that pip does not pull a multi-GB CUDA build; a torch already installed (e.g. a CUDA build) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install "torch==2.13.0"
python -m pip install -e ".${1:-}"
