#!/usr/bin/env bash
# GPU check (bench/gpu_check.py): packed vs unpacked loss, packed vs sdpa vs flash_attention_2
# tokens/s and peak memory, MFU, the memory planner's estimate, and a bf16 16k-token row with the chunked loss vs
# the plain one, on a ~1B Llama built from its config.
# Runs as is on a bare GPU machine without network: python3 with torch (CUDA), transformers, accelerate, peft and
# safetensors, but no hydra-core/omegaconf (the launcher's config imports them). Those come as wheels carried
# in .whl/ (git-ignored, ~400 KB), prepared on a machine with network from the project root:
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl hydra-core==1.3.8 omegaconf==2.3.1
#   pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only on PyPI; the wheel is pure Python
#
# datasets, deepspeed and wandb are not needed (the check calls launcher functions directly).
# They are installed into .whl/site (not into the system Python) and put on PYTHONPATH.
#
#   bash bench/gpu_check.sh [gpu_check.py options]     # ~2-3 min on one H100/H200; hard limit 8 min
#
# Results: $OUT/gpu_check.json when $OUT is set (else outputs/gpu_check.json), a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=$PWD/.whl/site
if ! PYTHONPATH=$SITE $PY -c "import hydra, omegaconf" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no wheels in .whl/: see the commands at the top of $0" >&2; exit 2; }
    $PY -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl
fi
export PYTHONPATH=$SITE:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__)"
exec timeout 480 $PY bench/gpu_check.py "$@"
