#!/usr/bin/env bash
# The benchmarks of one call on the lent GPU machine (its 15 minutes allow one call of about 9). Each step gets
# what is left of the budget (first argument, default 540 s) and writes <step>.json and .log, packed after every
# step into $OUT/results.tgz (a call brings back at most 8 files), so a step cut short still leaves the ones before
# it. STEPS picks and orders them (default: the ninth session's set):
#   gpu                benchmarks.gpu (no Kafka): the engine sweep, copies, InferenceEngine.score and the scoring
#                      half of the pipeline from memory (its own budget: 240 s, --quick 60 s)
#   gpu-quick          the same with --quick (one F and H, 1,000 streams; about a minute)
#   pipeline           the pipeline through a real broker at 1,000 and 100,000 streams
#   pipeline-fp16      the daemon in float16 (1,000 streams)
#   latency            event->alert latency at half capacity
#   pipeline-pydecode  the Python decoder, for an A/B of the native one (1,000 streams)
#   gpu-checks         benchmarks.gpu_checks: GPU against CPU scores, CUDA graphs against eager
#   graphs-on, graphs-off   the pipeline at 1,000 streams with and without the engine's CUDA graphs
#   intake             Daemon.process from memory on this host's CPU (benchmarks.intake --overhead): how fast
#                      the loop thread's own work is here, with no scoring thread beside it
#   neighbour          the same beside a thread of eager tiny-model forwards (--neighbour-ops, item 38)
#   windows-numpy      the pipeline at 1,000 streams with the numpy WindowBuffer.add (item 39), against graphs-on
#   poll-ahead-ab      confluent only, 1,000 streams: kafka.poll_ahead on and off in one run (item 48)
#
#   bash benchmarks/device_bundle.sh                           # here, once: .device-bundle (Java, Kafka, wheels)
#   run(command="bash benchmarks/device_run.sh", carry=[".device-bundle"], timeout_s=600)
#   run(command="STEPS='gpu-checks graphs-on graphs-off graphs-on' bash benchmarks/device_run.sh", ...)
#   run(command="STEPS='gpu pipeline' bash benchmarks/device_run.sh", ...)   # the GPU sweep, then the pipeline
#
# DEVICE=cpu EXTRA=--quick bash benchmarks/device_run.sh 120   # a dry run of the steps on this machine
set -uo pipefail
budget=${1:-540}
device=${DEVICE:-cuda}
extra=${EXTRA:-}
dest=${OUT:-/tmp/anomalyd-device-out}
out=$(mktemp -d)  # the steps' files, packed into $dest/results.tgz after each step
mkdir -p "$dest"
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
"$py" -m detector.fastpath build 2>&1 | tail -1  # the window kernel (WindowBuffer.add) lives in this extension

step() {  # step NAME MODULE ARGS...: python -m benchmarks.MODULE ARGS --json $out/NAME.json, cut at the budget
  local name=$1 module=$2 left=$((budget - SECONDS))
  if [[ -e "$out/$name.json" ]]; then  # a step named twice (an A/B/A): the second run gets its own files
    name="$name-2"
  fi
  shift 2
  if ((left < 40)); then
    echo "== $name skipped: ${left} s left"
    return
  fi
  echo "== $name (${left} s left)"
  # shellcheck disable=SC2086  # EXTRA is a list of words
  timeout -k 5 "$left" "$py" -m "benchmarks.$module" "$@" $extra --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
  tar -C "$out" -czf "$dest/results.tgz" .
}

one_k=(pipeline --device "$device" --scoring background --repeats 1 --streams 1000 --events 400000)
for name in ${STEPS:-pipeline pipeline-fp16 latency pipeline-pydecode}; do
  case $name in
    pipeline) step pipeline pipeline --device "$device" --scoring background --repeats 1 --events 400000 ;;
    pipeline-fp16) step pipeline-fp16 "${one_k[@]}" --precision float16 --repeats 3 ;;
    latency) step latency latency --device "$device" --seconds 30 --warm-broker-s 10 ;;
    pipeline-pydecode) ANOMALYD_NATIVE_DECODE=0 step pipeline-pydecode "${one_k[@]}" ;;
    gpu) step gpu gpu --device "$device" ;;
    gpu-quick) step gpu-quick gpu --device "$device" --quick ;;
    gpu-checks) step gpu-checks gpu_checks --device "$device" ;;
    graphs-on) ANOMALYD_CUDA_GRAPHS=auto step graphs-on "${one_k[@]}" ;;
    graphs-off) ANOMALYD_CUDA_GRAPHS=0 step graphs-off "${one_k[@]}" ;;
    intake) step intake intake --chunk 5000 --streams 1000 --overhead ;;
    windows-numpy) ANOMALYD_NATIVE_WINDOWS=0 step windows-numpy "${one_k[@]}" ;;
    poll-ahead-ab) step poll-ahead-ab "${one_k[@]}" --clients confluent --poll-ahead-ab ;;
    neighbour) step neighbour intake --chunk 5000 --streams 1000 --neighbour-ops 0 --neighbour-ops 20 \
      --neighbour-call forward ;;
    *) echo "unknown step $name" >&2; exit 2 ;;
  esac
done
echo "== done in ${SECONDS} s"
