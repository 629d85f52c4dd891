#!/usr/bin/env bash
# The GPU check, one script: on a CUDA machine with PyTorch and Triton installed and no
# network, install sambayes from this working tree, run the GPU tests, the compiled-code
# check and the step benchmark, and copy the results to $OUT when it is set. Within 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
LOG=$(mktemp -d)/gpu_check
mkdir -p "$LOG" "$RESULTS"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
status=0
step() { echo; echo "== $* ($(date +%T))"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$LOG/device.txt"

step "install (no build isolation, no dependencies: nothing is downloaded)"
timeout 170 pip install --no-build-isolation --no-deps -e . >"$LOG/install.txt" 2>&1 || { tail -30 "$LOG/install.txt"; status=1; }
python -m sambayes info 2>/dev/null | tee "$LOG/info.txt" || python -c "import sambayes.backends as b; print(b.info())" | tee "$LOG/info.txt"

step "GPU tests: triton tier, C++/CUDA tier, compiled-code check"
timeout 80 python -m pytest tests -q -k "triton or cuda" --durations=10 2>&1 | tee "$LOG/pytest.txt" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "compiled code for this GPU: 128-bit accesses, no local memory"
arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)")
timeout 30 python -m sambayes.kernels._compile_check --arch "$arch" --dtypes fp32,bf16 2>/dev/null | tee "$LOG/compiled.jsonl" | tail -3

step "benchmark: GPT-2 small shapes (124M parameters), float32 and bfloat16; ResNet-50"
timeout 90 python benchmarks/bench_step.py --preset gpt2 --budget 1 2>&1 | tee "$LOG/bench_gpt2.txt" | grep -v "bench_step:" 
timeout 25 python benchmarks/bench_step.py --preset gpt2 --dtype bfloat16 --budget 1 --impls triton,cuda,torch,torch.compile,copy 2>&1 \
  | tee "$LOG/bench_gpt2_bf16.txt" | grep -v "bench_step:"
timeout 25 python benchmarks/bench_step.py --preset resnet50 --budget 1 --impls triton,cuda,torch,torch.compile,adamw_fused,copy 2>&1 | tee "$LOG/bench_resnet50.txt" | grep -v "bench_step:"

step "benchmark: whole training step, bSAM and SAM vs SGD (ResNet-18 w64, batch 200, k = 1, 8)"
timeout 60 python benchmarks/bench_train_step.py --device cuda --reps 50 2>&1 | tee "$LOG/bench_train_step.txt"

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp -r "$LOG" "$OUT/"
  cp "$RESULTS"/*.csv "$OUT/" 2>/dev/null
  echo "copied logs and $(ls "$RESULTS"/*.csv 2>/dev/null | wc -l) CSV files to $OUT"
fi
exit $status
