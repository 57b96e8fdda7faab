#!/usr/bin/env bash
# The benchmarks of one call on the lent GPU machine (its 15 minutes allow one call of about 9): the pipeline
# through a real broker at 1,000 and 100,000 streams, the daemon in float16, event->alert latency, and the pipeline
# with the Python decoder for an A/B of the native one. Each step gets what is left of BUDGET_S (default 540) and
# writes $OUT/<step>.json and .log, so a step cut short still leaves the ones before it.
#
#   bash benchmarks/device_bundle.sh                           # here, once: .device-bundle (Java, Kafka, wheels)
#   run(command="bash benchmarks/device_run.sh", carry=[".device-bundle"], timeout_s=600)
#
# DEVICE=cpu EXTRA=--quick bash benchmarks/device_run.sh 120   # a dry run of the steps on this machine
set -uo pipefail
budget=${1:-540}
device=${DEVICE:-cuda}
extra=${EXTRA:-}
out=${OUT:-/tmp/anomalyd-device-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=python3
if [[ "$device" == cuda ]]; then
  eval "$(bash benchmarks/device_bundle.sh --unpack .device-bundle)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nproc
else
  py="${ANOMALYD_CACHE:-$HOME/.cache/anomalyd}/venv/bin/python"
fi
"$py" -m pipelines.native_decode build 2>&1 | tail -3

step() {  # step NAME MODULE ARGS...: python -m benchmarks.MODULE ARGS --json $out/NAME.json, cut at the budget
  local name=$1 module=$2 left=$((budget - SECONDS))
  shift 2
  if ((left < 40)); then
    echo "== $name skipped: ${left} s left"
    return
  fi
  echo "== $name (${left} s left)"
  # shellcheck disable=SC2086  # EXTRA is a list of words
  timeout -k 5 "$left" "$py" -m "benchmarks.$module" "$@" $extra --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
}

step pipeline pipeline --device "$device" --scoring background --repeats 1 --events 400000
step pipeline-fp16 pipeline --device "$device" --precision float16 --scoring background --streams 1000 \
  --events 400000
step latency latency --device "$device" --seconds 30 --warm-broker-s 10
ANOMALYD_NATIVE_DECODE=0 step pipeline-pydecode pipeline --device "$device" --scoring background --repeats 1 \
  --streams 1000 --events 400000
echo "== done in ${SECONDS} s"
