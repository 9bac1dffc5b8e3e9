#!/usr/bin/env bash
# The GPU run, on the lent machine as it is (one H200; its own python3 with torch, triton, pytest,
# hypothesis, nvcc and compute-sanitizer; no network, no package registry): no venv, no downloads.
#
#   bash scripts/gpu_check.sh             every phase (about 8 minutes)
#   bash scripts/gpu_check.sh --quick     a second try: build, info, GPU tests, memcheck, the ViT-S acn step
#   bash scripts/gpu_check.sh --fuzz N    build, then N randomized cases per op and backend on the
#                                         Triton kernels compiled for real (seed 0; what the CPU's
#                                         interpreter, at about 5 s a case, cannot run at N = 1000)
#   bash scripts/gpu_check.sh --dry-run   print each phase's command instead of running it
#
# Phases, each with its own time limit so that the run ends within the 10 minutes one command may
# take: the CUDA extension for sm_90 (16 jobs); info; the GPU tests (Triton compiled for real and
# backend="cuda", every op, forward and backward, every dtype); compute-sanitizer memcheck over one
# small run of every CUDA kernel (scripts/cuda_smoke.py); the op benchmarks (norm ops at 8192 x 2048,
# probe_norm, the GEMM ops: triton, cublas and cuda against eager and torch.compile); every depth's
# loss at GPT-2's shapes (depth_cross_entropy: peak memory and time, reference, chunked and Triton);
# the ViT-S/16 training steps (acn, residual). The limits add up to 8 minutes.
# Everything goes under $OUT (default ./gpu_out): gpu_check.log (all output), phases.txt (each
# phase's exit code and seconds), bench.csv and the plots. A failing phase does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=0
DRY_RUN=0
FUZZ=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --fuzz)
      FUZZ="${2:-}"; shift
      [[ "$FUZZ" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: --fuzz needs a positive count, got '$FUZZ'" >&2; exit 2; } ;;
    *) echo "gpu_check.sh: unknown option '$1' (expected --quick, --fuzz N or --dry-run)" >&2; exit 2 ;;
  esac
  shift
done

OUT="${OUT:-$PWD/gpu_out}"
PYTHON="${PYTHON:-python3}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export ACN_KERNELS_BUILD_CUDA=1 ACN_KERNELS_CUDA_ARCHS=90 ACN_KERNELS_BUILD_JOBS=16
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this tree, installed or not
LOG="$OUT/gpu_check.log"
PHASES="$OUT/phases.txt"
if [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$OUT"
  : > "$PHASES"
fi

# phase NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output to the log and the
# terminal, and records the exit code and the seconds it took.
phase() {
  local name="$1" limit="$2"
  shift 2
  if [ "$DRY_RUN" = 1 ]; then
    printf '%-16s (at most %4ss)  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  echo "=== $name: $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local code=${PIPESTATUS[0]}
  printf '%-16s exit %3s  %4ss\n' "$name" "$code" "$((SECONDS - start))" | tee -a "$PHASES"
}

# The stack found beside the tested ones (one line for each that differs), then on: a GPU run is too
# rare to refuse over a version.
if [ "$DRY_RUN" = 1 ]; then
  "$PYTHON" acn_kernels/versions.py
else
  "$PYTHON" acn_kernels/versions.py 2>&1 | tee -a "$LOG"
fi
phase build 110 bash -c "$PYTHON -m pip install --no-build-isolation --no-deps -e . || \
  { echo 'pip failed: building the extension in place instead'; $PYTHON setup.py build_ext --inplace; }"
if [ -n "$FUZZ" ]; then
  phase fuzz 420 env HYPOTHESIS_PROFILE=fuzz ACN_KERNELS_FUZZ_EXAMPLES="$FUZZ" "$PYTHON" -m pytest -q \
    -p no:cacheprovider tests/test_randomized.py -k "triton or cublas" --hypothesis-seed=0
else
  phase info 20 "$PYTHON" -m acn_kernels info
  phase gpu-tests 90 "$PYTHON" -m pytest -m gpu -x -q -p no:cacheprovider tests/
  phase memcheck 40 compute-sanitizer --tool memcheck --error-exitcode 1 "$PYTHON" scripts/cuda_smoke.py
  # One bench call per twin: a call cut by its limit still writes what it measured, and the acn step
  # (the one the targets name) comes first.
  TWINS="acn residual"
  if [ "$QUICK" = 1 ]; then
    TWINS="acn"
  else
    phase bench-ops 70 "$PYTHON" -m acn_kernels bench --suite ops \
      --cases '8192x2048|probe_norm|linear_act_accumulate|feed_forward|linear ' --out "$OUT"
    # every depth's loss at GPT-2's shapes: peak memory and time of the reference, chunked and Triton paths
    phase bench-loss 60 "$PYTHON" -m acn_kernels bench --suite loss --out "$OUT"
  fi
  for twin in $TWINS; do
    phase "bench-vit-$twin" 45 "$PYTHON" -m acn_kernels bench --suite models --cases "ViT-S/16 224 $twin" --out "$OUT"
  done
fi

[ "$DRY_RUN" = 1 ] && exit 0
echo "=== phases (exit code, seconds); full output in $LOG"
cat "$PHASES"
! grep -qv ' exit   0 ' "$PHASES"
