#!/usr/bin/env bash
# README command 1: install, then train KTO on the embedded tiny default (offline, a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
trl-kto-ext --config configs/tiny-cpu.yaml "$@"
