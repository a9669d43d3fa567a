#!/usr/bin/env bash
# One-GPU smoke test of the paths CPU tests cannot reach (training on the GPU from the in-memory shard, a
# sampling actor on its GPU, the vLLM engine against the transformers engine); prints a table.
# Run from anywhere, in an environment with qpo-ray[vllm] and a CUDA GPU (the -gpu image):
#   scripts/gpu_smoke.sh                       # a few minutes
#   scripts/gpu_smoke.sh --dry-run             # CPU only: the config and inputs, nothing run
#   scripts/gpu_smoke.sh --policy-model /models/gpt2 --target-model /models/SmolLM2-135M-Instruct
# PY picks the interpreter (default: python3); SMOKE_TIMEOUT_S bounds the whole run (default 900).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${SMOKE_TIMEOUT_S:-900}" "$PY" scripts/gpu_smoke.py "$@"
