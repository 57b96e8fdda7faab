#!/usr/bin/env bash
# Accuracy benchmark: NAB (35-file subset), SMD and ASD with the GRU and LSTM autoencoders and the
# windowed-Gaussian baseline, through `anomalyd evaluate`. Needs the labelled data in ../shared/data
# (override with DATA=...). Not part of `make test`: a full run takes tens of minutes on 2 CPU cores.
#
#   benchmarks/run_accuracy.sh            # everything
#   benchmarks/run_accuracy.sh nab        # one part: nab | smd | asd
#
# Outputs go to $OUT (default out/benchmarks/, which .gitignore covers):
# <part>.json (all figures), <part>.md (the Markdown comparison table), <part>.log, plots/<part>/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${DATA:-$ROOT/../shared/data}"
OUT="${OUT:-$ROOT/out/benchmarks}"
PY="${PY:-${ANOMALYD_VENV:-$HOME/.cache/anomalyd/venv}/bin/python}"
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(nab smd asd)

if [ -d "$DATA" ]; then DATA="$(cd "$DATA" && pwd)"; fi
if [ ! -d "$DATA" ]; then
    echo "no benchmark data at $DATA (set DATA=...)" >&2
    exit 1
fi
mkdir -p "$OUT"
cd "$ROOT"

evaluate() {  # evaluate <part> <subcommand> <data dir> [extra args...]
    local part="$1" sub="$2" dir="$3"
    shift 3
    local start=$SECONDS
    echo "== $part: evaluate $sub on $dir" >&2
    "$PY" -m pipelines.evaluation.cli "$sub" --data "$dir" --model gru,lstm \
        --output "$OUT/$part.json" --report "$OUT/$part.md" --plots "$OUT/plots/$part" "$@" \
        2> "$OUT/$part.log"
    echo "== $part done in $((SECONDS - start)) s; table in $OUT/$part.md" >&2
}

for part in "${PARTS[@]}"; do
    case "$part" in
        nab) evaluate nab nab "$DATA/nab" --scores-dir "$OUT/nab_scores" ;;
        smd) evaluate smd multivariate "$DATA/smd" ;;
        asd) evaluate asd multivariate "$DATA/asd" ;;
        *) echo "unknown part $part (nab | smd | asd)" >&2; exit 2 ;;
    esac
done
