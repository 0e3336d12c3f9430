#!/usr/bin/env bash
# The device check, in one go on a CUDA machine without network: install the project, run the whole
# test suite on the GPU, then the quick performance report. Logs and results go to $OUT (default
# perf/gpu_check_out). Each step has its own time limit, so the whole check ends within 8 minutes, and
# a step that fails or runs out of time does not stop the next one. Exits non-zero if any step failed.
#
#     OUT=/some/dir bash perf/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-perf/gpu_check_out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
failed=0

step() {  # step NAME SECONDS COMMAND...: run COMMAND with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=5 "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    [ "$status" -eq 124 ] && echo "   timed out" >>"$OUT/$name.log"
    echo "   $name: exit $status after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
    tail -n 5 "$OUT/$name.log"
    [ "$status" -eq 0 ] || failed=1
}

: >"$OUT/steps.txt"
step environment 15 bash -c "nvidia-smi; $PYTHON -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
step install 45 "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
# The ahead-of-time compile check and the trainer's tests do not use the GPU (the trainer's run on the CPU
# by design) and run in CI; here the time goes to the tests that do.
step tests 150 "$PYTHON" -m pytest -x -q --durations=10 --ignore=tests/test_aot.py --ignore=tests/test_train.py
step perf 270 "$PYTHON" perf/run.py --quick --out "$OUT/results"
echo "== total $SECONDS s; logs in $OUT"
exit $failed
