#!/usr/bin/env bash
# README command 1: install, then train KTO on the embedded tiny default (offline; on 2 CPU cores about 15 s once installed
# and cached, 2-3 minutes on a fresh machine: install and a one-time tiny-model build).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
trl-kto-ext --config configs/tiny-cpu.yaml "$@"
