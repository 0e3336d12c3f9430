#!/usr/bin/env bash
# The device check on a CUDA machine without network, in two invocations that each end within 7 minutes
# (every step has its own time limit; a step that fails or runs out of time does not stop the next):
#
#     OUT=/some/dir bash perf/gpu_check.sh 1   # install; the ops' CUDA tests; tuning; the op table
#     OUT=/some/dir bash perf/gpu_check.sh 2   # the kernel profile; perf/run.py --quick
#
# Step 1 writes sknet_triton/tuned/sm_<cc>.json (copied to $OUT) before the op table, which then runs on
# it. Scripts that write as they go (tuning's candidates, the op table, the profile, run.py) leave what
# they measured when their limit cuts them short. Logs and results are packed into $OUT: steps.txt,
# summary.txt (each log's last lines) and step<N>.tar.gz (everything else). Exits non-zero if any step
# failed.
set -u
cd "$(dirname "$0")/.."
PART="${1:-}"
OUT="${OUT:-perf/gpu_check_out}"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d)/step$PART"
mkdir -p "$OUT" "$WORK"
failed=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, log to $WORK/NAME.log
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@" >"$WORK/$name.log" 2>&1
    status=$?
    [ "$status" -eq 124 ] && echo "   timed out" >>"$WORK/$name.log"
    echo "   step $PART $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
    { echo "== $name: exit $status"; tail -n 40 "$WORK/$name.log"; } >>"$OUT/summary$PART.txt"
    [ "$status" -eq 0 ] || failed=1
}

case "$PART" in
1)
    : >"$OUT/summary1.txt"
    step environment 15 bash -c "nvidia-smi; $PYTHON -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
    step install 35 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
    # The kernels' tests on CUDA (fuse, select, training-mode BatchNorm, split), and CUDA graphs on the smallest model and on sknet50 (each model's compile is
    # tens of seconds: `pytest tests/test_cuda_graphs.py` covers every registered model on its own).
    step tests 120 "$PYTHON" -m pytest -q --durations=10 tests/test_ops.py tests/test_ops_compile.py \
        tests/test_ops_validation.py tests/test_launch.py tests/test_bn_train.py tests/test_split.py
    step cuda_graphs 50 "$PYTHON" -m pytest -q --durations=5 tests/test_cuda_graphs.py -k "sknet_tiny or sknet50"
    step tune 110 "$PYTHON" perf/tune.py --budget-s 80 --out "$WORK/tune"
    cp sknet_triton/tuned/sm_*.json "$WORK/" 2>/dev/null
    # Ordered by shape, largest first: a run cut short has the shapes the targets name.
    step ops 80 "$PYTHON" perf/ops.py --budget-s 50 --out "$WORK/ops"
    ;;
2)
    : >"$OUT/summary2.txt"
    step install 35 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
    step profile 170 "$PYTHON" perf/kernel_profile.py --out "$WORK/profile"
    step perf 190 "$PYTHON" perf/run.py --quick --no-ops --out "$WORK/results"
    ;;
*)
    echo "usage: OUT=DIR bash perf/gpu_check.sh 1|2" >&2
    exit 2
    ;;
esac
tar -czf "$OUT/step$PART.tar.gz" -C "$(dirname "$WORK")" "step$PART"
echo "== step $PART: total $SECONDS s; $OUT holds steps.txt, summary$PART.txt, step$PART.tar.gz"
exit $failed
