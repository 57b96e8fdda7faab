#!/usr/bin/env bash
# The local single-node Kafka 4.x broker used by the tests and the demo (see pipelines/kafka_local.py).
# Usage: scripts/kafka.sh start|stop|status|jars [--port N] [--data-dir DIR] [--heap 512m] [--timeout S]
#        [--sasl-port N] [--sasl-ssl-port N] [--ssl-port N] [--mtls-port N] [--sasl-user U]  (all: --help)
# Default port 19092 (or $ANOMALYD_KAFKA_PORT). "start" prints the bootstrap servers once the broker answers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${ANOMALYD_VENV:-${ANOMALYD_CACHE:-$HOME/.cache/anomalyd}/venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    # The module needs only the standard library for start/stop/status.
    echo "kafka.sh: no virtualenv at $VENV (run 'make setup'); using python3" >&2
    PY=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m pipelines.kafka_local "$@"
