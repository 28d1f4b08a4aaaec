#!/usr/bin/env bash
# GPU check (<= 10 minutes on one recent GPU): the CUDA tests (4-bit QLoRA, bf16), then the benchmark on CUDA with TRL's
# defaults (bf16 + gradient checkpointing) on SmolLM2-135M's shape and on Qwen2-0.5B's shape (random weights), both
# data shapes each. Prints the benchmark's ratio and targets tables; the JSON files (tokens/step, CUDA peak memory per
# arm) land in $OUT or /tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT_DIR"
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRL_KTO_EXT_REF_CACHE="$OUT_DIR/ref_cache"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
timeout 150 python -m pytest -x -q tests/core/test_qlora.py tests/logprobs/test_fast_path.py 2>&1 | tail -5
for model in smollm2-135m qwen2-0.5b; do for shape in short chat; do
  timeout 110 python scripts/benchmark.py --model "$model" --shape "$shape" --bf16 --gradient-checkpointing \
    --arms sft,trl_default,trl_precompute,ext_default,ext_precompute --out "$OUT_DIR/bench_${model}_$shape.json" | tail -30
  python - "$OUT_DIR/bench_${model}_$shape.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
for row in data["arms"]:
    tokens = row.get("tokens_per_step") or 0
    step = row.get("median_step_s") or float("nan")
    print(f"{row['arm']:>16}: {tokens / step:9.0f} tokens/s  CUDA peak {row.get('cuda_peak_mb') or 0:8.0f} MB")
PY
done; done
