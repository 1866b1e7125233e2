#!/usr/bin/env bash
# GPU verification of the kernels="cuda" path, one call, under 8 minutes on one NVIDIA GPU:
#   1. the GPU and torch's CUDA build; the cuda extra (mamba-ssm, causal-conv1d) unless already importable;
#   2. the cuda-path tests on the real GPU: tests/test_cuda_path.py with IEEE fp32 tl.dot (fp32 within 1e-5),
#      then the GPU case of tests/test_ops.py with Triton's default TF32 tl.dot (its TF32 tolerance);
#   3. bench/bench_gpu.py: ssd_chunked cuda vs torch vs mamba-ssm's mamba_chunk_scan_combined on the same
#      inputs, the decode step, one bf16 distillation stage on the embedded teacher; appends to BENCHMARKS.md.
# Each step has its own time limit; the script stops at the first failure and says which step it was.
#
#   bash bench/gpu_check.sh
#   PY=/path/to/python WHEELS=/dir/with/wheels bash bench/gpu_check.sh   # offline install from local wheels
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 )) s] $*"; }
trap 'echo "gpu_check: FAILED in the step above (exit $?)" >&2' ERR

step "GPU and torch"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PYEOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU; "
             "install a CUDA build of torch")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}")
PYEOF

step "llamba and the cuda extra"
"$PY" -c "import llamba.distill, gguf" 2>/dev/null || timeout 120 "$PY" -m pip install -q -e ".[teacher,dev]"
if ! "$PY" -c "import causal_conv1d, mamba_ssm.ops.triton.ssd_combined" 2>/dev/null; then
  offline=()
  if [ -n "${WHEELS:-}" ]; then offline=(--no-index --find-links "$WHEELS"); fi
  timeout 120 "$PY" -m pip install -q "${offline[@]}" --no-build-isolation -e ".[cuda]"
fi
"$PY" - <<'PYEOF'
import sys

import mamba_ssm
import triton

from llamba.ops import _cuda_import_error, _cuda_kernels

if _cuda_kernels() is None:
    sys.exit(_cuda_import_error())
import causal_conv1d

print(f"mamba-ssm {mamba_ssm.__version__}, causal-conv1d {causal_conv1d.__version__}, triton {triton.__version__}")
PYEOF

step "cuda-path tests on the GPU, IEEE fp32 tl.dot"
TRITON_F32_DEFAULT=ieee timeout 150 "$PY" -m pytest -q -rs tests/test_cuda_path.py
step "tests/test_ops.py GPU case, default (TF32) tl.dot"
timeout 45 "$PY" -m pytest -q -rs tests/test_ops.py -k cuda

step "bench/bench_gpu.py (appends to BENCHMARKS.md)"
timeout 150 "$PY" bench/bench_gpu.py
step "done"
