#!/usr/bin/env bash
# The device check on a CUDA machine without network, in one invocation of at most $TOTAL_S seconds
# (default 560: one call of a 10-minute limit, with room for the archive). Steps run by priority, each
# with its own time limit, cut to what is left of the total; a step that fails or runs out of time does
# not stop the next, and a step with under 20 s left is skipped. Two runs, each sized for one call:
#
#     OUT=/some/dir bash perf/gpu_check.sh            # run 1: the kernels and inference
#     OUT=/some/dir bash perf/gpu_check.sh train      # run 2: training and latency
#
# Run 1: install; the kernels' tests on CUDA (fuse, select, training-mode BatchNorm, split; pytest-xdist's
#   workers, as pyproject.toml sets); tuning (perf/tune.py, bf16 channels_last: the split kernel against
#   cuDNN, then the sweep; writes sknet_triton/tuned/sm_<cc>.json, which the later steps use); the op table
#   (perf/ops.py --quick); perf/run.py --quick's SKNet-50 inference rows, then its ResNeSt-50 ones; if time
#   is left, the CUDA-graph test for sknet_tiny and sknet50, and the kernel profile.
# Run 2: install; the training-mode kernels' tests on CUDA (a wrong gradient costs a whole diverged run, so
#   they come first); perf/run.py's training rows (timm skresnext50_32x4d and sknet50, eager and compiled,
#   bf16, channels_last, B = 128, with peak memory; compiling one takes 1-2 minutes) and the CUDA-graph
#   latency table; ResNeSt-50's compiled training rows (timm's and sknet_triton's); the CUDA-graph test;
#   the kernel profile of one training step.
#
# Scripts that write as they go (tuning's candidates, the op table, run.py, the profile) leave what they
# measured when their limit cuts them short. $OUT receives steps.txt (one line a step), summary.txt (each
# log's last lines), the tuned table, and results.tar.gz (every log and output), packed again after every
# step so that a cut-off call still returns what was done. Exits non-zero if any step failed.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-perf/gpu_check_out}"
PYTHON="${PYTHON:-python}"
TOTAL_S="${TOTAL_S:-560}"
MODE="${1:-kernels}"
case "$MODE" in kernels | train) ;; *) echo "gpu_check.sh: unknown mode '$MODE' (kernels or train)" >&2; exit 2 ;; esac
WORK="$(mktemp -d)/gpu_check"
mkdir -p "$OUT" "$WORK"
: >"$OUT/steps.txt"
: >"$OUT/summary.txt"
failed=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, log to $WORK/NAME.log
    local name=$1 limit=$2 start=$SECONDS status left=$((TOTAL_S - SECONDS))
    shift 2
    if [ "$left" -lt 20 ]; then
        echo "   $name: skipped, ${left} s left of ${TOTAL_S}" | tee -a "$OUT/steps.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    status=$?
    [ "$status" -eq 124 ] && echo "   timed out" >>"$WORK/$name.log"
    echo "   $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
    { echo "== $name: exit $status"; tail -n 40 "$WORK/$name.log"; } >>"$OUT/summary.txt"
    [ "$status" -eq 0 ] || failed=1
    tar -czf "$OUT/results.tar.gz" -C "$(dirname "$WORK")" gpu_check
}

step environment 15 bash -c "nvidia-smi; $PYTHON -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
step install 40 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
case "$MODE" in
kernels)
    step tests 100 "$PYTHON" -m pytest -q -rf --durations=10 tests/test_ops.py tests/test_ops_compile.py \
        tests/test_ops_validation.py tests/test_launch.py tests/test_bn_train.py tests/test_split.py tests/test_compiled_path.py tests/test_resnest.py
    step tune 120 "$PYTHON" perf/tune.py --budget-s 75 --dtypes bf16 --layouts channels_last --out "$WORK/tune"
    cp sknet_triton/tuned/*.json "$OUT/" 2>/dev/null
    step ops 80 "$PYTHON" perf/ops.py --quick --budget-s 45 --out "$WORK/ops"
    step perf 190 "$PYTHON" perf/run.py --quick --no-ops --modes inference \
        --variants timm-sk,timm-sk-compiled,sknet,sknet-compiled,timm-plain-compiled --out "$WORK/results"
    step resnest 150 "$PYTHON" perf/run.py --quick --no-ops --modes inference \
        --variants timm-resnest,timm-resnest-compiled,resnest,resnest-compiled --out "$WORK/resnest"
    step cuda_graphs 80 "$PYTHON" -m pytest -q -rf tests/test_cuda_graphs.py -k "sknet_tiny or sknet50"
    step profile 120 "$PYTHON" perf/kernel_profile.py --out "$WORK/profile"
    ;;
train)
    step tests 60 "$PYTHON" -m pytest -q -rf --durations=10 tests/test_bn_train.py
    step train 330 "$PYTHON" perf/run.py --quick --no-ops --modes train \
        --variants timm-sk,timm-sk-compiled,sknet,sknet-compiled --out "$WORK/results"
    step resnest_train 150 "$PYTHON" perf/run.py --quick --no-ops --modes train \
        --variants timm-resnest-compiled,resnest-compiled --out "$WORK/resnest"
    step cuda_graphs 60 "$PYTHON" -m pytest -q -rf tests/test_cuda_graphs.py -k "sknet_tiny or sknet50"
    step profile 90 "$PYTHON" perf/kernel_profile.py --modes train --out "$WORK/profile"
    ;;
esac
echo "== total $SECONDS s; $OUT holds steps.txt, summary.txt, the tuned table and results.tar.gz"
exit $failed
