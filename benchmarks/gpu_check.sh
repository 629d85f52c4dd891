#!/usr/bin/env bash
# The GPU check, one script: on a CUDA machine with PyTorch and Triton installed and no
# network, install sambayes from this working tree (building the CUDA tier), run the GPU
# tests, the compiled-code check and the benchmarks, and leave logs and CSVs in $OUT when
# it is set. The whole script stays within 8 minutes: each step gets the smaller of its own
# limit and what is left, and writes its log as it goes, so a cut-off keeps what was done.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=benchmarks/results
LOG=${OUT:-$(mktemp -d)}/gpu_check
mkdir -p "$LOG" "$RESULTS"
unset TRITON_INTERPRET SAMBAYES_NO_CUDA
DEADLINE=$(( $(date +%s) + 470 ))
status=0
step() { echo; echo "== $* ($(date +%T))"; }
limit() { local left=$(( DEADLINE - $(date +%s) )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
check() { if [ "$1" -ne 0 ]; then echo "!! $2 failed (exit $1)"; status=1; fi; }
save() { [ -n "${OUT:-}" ] && cp "$RESULTS"/*.csv "$OUT/" 2>/dev/null; return 0; }

step "environment"
timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$LOG/device.txt"

step "install (no build isolation, no dependencies: nothing is downloaded); builds the CUDA kernels"
timeout "$(limit 170)" pip install --no-build-isolation --no-deps -e . >"$LOG/install.txt" 2>&1
check $? "install"; tail -5 "$LOG/install.txt"
python -c "import sambayes._C as C, sys; print('CUDA kernels compiled:', C.cuda_compiled, C.cuda_note); sys.exit(not C.cuda_compiled)"
check $? "the CUDA build of sambayes._C"
timeout 60 python -m sambayes info | tee "$LOG/info.txt"

step "GPU tests, the most telling first: no sync on the hot path and CUDA-graph capture (a replay after 300 other tables cycled the launch-table cache), then every phase, AMP, trajectories"
timeout "$(limit 70)" python -m pytest tests/test_hot_path.py tests/test_capturable.py -q -k "cuda or triton or captured" \
  2>&1 | tee "$LOG/pytest_hot_path.txt" | tail -15
check "${PIPESTATUS[0]}" "hot-path and capture GPU tests"

step "Triton variants: the seeded kernels (sample, bfloat16-state update) compile no new variant over ten steps"
timeout "$(limit 40)" python -m pytest tests/test_triton_variants.py -q -s -k gpu 2>&1 | tee "$LOG/triton_variants.txt" \
  | grep -E "compiled variants|passed|failed"
check "${PIPESTATUS[0]}" "Triton variant count"
timeout "$(limit 150)" python -m pytest tests -q -k "triton or cuda" --deselect tests/test_nvcc_compile.py \
  --deselect tests/test_hot_path.py --deselect tests/test_capturable.py --durations=10 2>&1 | tee "$LOG/pytest.txt" | tail -25
check "${PIPESTATUS[0]}" "GPU tests"

step "sambayes bench: the quick comparison of the backends that users run, on the GPU"
timeout "$(limit 40)" python -m sambayes bench --device cuda 2>&1 | tee "$LOG/sambayes_bench.txt" | grep -v "sambayes bench: "
check "${PIPESTATUS[0]}" "sambayes bench"

step "compiled code for this GPU: 128-bit accesses, no local memory; instructions per element and the predicted share of copy"
arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(10 * m + n)")
STARTED=$(date +%Y-%m-%dT%H:%M:%S)
timeout "$(limit 30)" python -m sambayes.kernels._compile_check --arch "$arch" --dtypes fp32,bf16 --stored state,bf16 \
  >"$LOG/compiled.jsonl" 2>"$LOG/compiled.err"
check $? "compiled-code check"; tail -3 "$LOG/compiled.jsonl"

step "benchmark: GPT-2 small shapes (124M parameters), float32, every implementation"
timeout "$(limit 110)" python benchmarks/bench_step.py --preset gpt2 --budget 1 2>&1 | tee "$LOG/bench_gpt2.txt" \
  | grep -v "bench_step:"
check "${PIPESTATUS[0]}" "bench_step gpt2"; save

step "benchmark: GPT-2 small, bfloat16 parameters; ResNet-50 shapes (no torch.compile: its compile time)"
timeout "$(limit 30)" python benchmarks/bench_step.py --preset gpt2 --dtype bfloat16 --budget 1 \
  --impls triton,cuda,torch,copy 2>&1 | tee "$LOG/bench_gpt2_bf16.txt" | grep -v "bench_step:"
check "${PIPESTATUS[0]}" "bench_step gpt2 bf16"; save
timeout "$(limit 30)" python benchmarks/bench_step.py --preset resnet50 --budget 1 \
  --impls triton,cuda,torch,adamw_fused,copy 2>&1 | tee "$LOG/bench_resnet50.txt" | grep -v "bench_step:"
check "${PIPESTATUS[0]}" "bench_step resnet50"; save

step "benchmark: GPT-2 small with bfloat16 precision and momentum (BSAM(state_dtype=torch.bfloat16)): update and step"
timeout "$(limit 25)" python benchmarks/bench_step.py --preset gpt2 --budget 1 --impls triton,cuda,copy --bf16-state \
  --phases update,step 2>&1 | tee "$LOG/bench_gpt2_bf16_state.txt" | grep -v "bench_step:"
check "${PIPESTATUS[0]}" "bench_step gpt2 bf16 state"; save

step "the model against the GPU: predicted share of copy next to the measured one (benchmarks/results/predicted_vs_measured.csv)"
timeout "$(limit 90)" python -m sambayes.kernels._compile_check_cuda --arch "$arch" \
  >"$LOG/compiled_cuda.jsonl" 2>"$LOG/compiled_cuda.err"
check $? "compiled-code check (CUDA)"
timeout "$(limit 20)" python benchmarks/predicted_vs_measured.py --triton "$LOG/compiled.jsonl" \
  --cuda "$LOG/compiled_cuda.jsonl" --since "$STARTED" 2>&1 | tee "$LOG/predicted_vs_measured.txt"
check "${PIPESTATUS[0]}" "predicted vs measured"; save

step "optimizer memory on the GPU (max_memory_allocated): bSAM, bSAM bf16 state, AdamW; float32, k = 1"
timeout "$(limit 25)" python benchmarks/bench_memory.py --device cuda --dtypes float32 --splits 1 \
  --optimizers bsam,bsam-bf16,adamw --markdown 2>&1 | tee "$LOG/bench_memory.txt"
check "${PIPESTATUS[0]}" "bench_memory"; save

step "benchmark: launch-bound (1,000 tensors of 1,000), host time per step against AdamW; capturable and a CUDA-graph replay"
timeout "$(limit 30)" python benchmarks/bench_step.py --launch-bound --capturable --reps 20 2>&1 | tee "$LOG/bench_launch_bound.txt"
check "${PIPESTATUS[0]}" "bench_step launch-bound"; save

step "benchmark: whole training step, bSAM and SAM vs SGD (ResNet-18 w64, batch 200, k = 1, 8)"
timeout "$(limit 60)" python benchmarks/bench_train_step.py --device cuda --reps 50 2>&1 | tee "$LOG/bench_train_step.txt"
check "${PIPESTATUS[0]}" "bench_train_step"; save

echo; echo "gpu_check: $( ((status)) && echo FAILED || echo passed ) at $(date +%T); logs in $LOG"
exit $status
