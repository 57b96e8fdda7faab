#!/usr/bin/env bash
# Idempotent, cached setup: a virtualenv outside the clone with the project's Python deps,
# plus the Debian packages the integration tests use. A second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${ANOMALYD_CACHE:-$HOME/.cache/anomalyd}"
VENV="${ANOMALYD_VENV:-$CACHE/venv}"
mkdir -p "$CACHE"
# One setup at a time per cache (a developer's `make test` and CI's share it); a second waits for the first.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.setup.lock"
    flock 9
fi

# A virtualenv is complete once marked: one whose creation failed (no python3-venv: ensurepip) or was killed is
# made again rather than trusted because bin/python exists.
if [ ! -f "$VENV/.created" ]; then
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        touch "$VENV/.created"  # made before the marker existed (its setuptools is checked below)
    else
        echo "setup: creating virtualenv $VENV"
        rm -rf "$VENV"
        python3 -m venv "$VENV" || { echo "setup: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
        "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
        touch "$VENV/.created"
    fi
fi

# Reinstall deps only when pyproject.toml or the tested versions (scripts/constraints.txt) changed.
stamp="$VENV/.deps-$(cat pyproject.toml scripts/constraints.txt | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "setup: installing Python dependencies (first run downloads torch, a few minutes)"
    "$VENV/bin/pip" install -q -c scripts/constraints.txt -e '.[dev]'
    rm -f "$VENV"/.deps-*
    touch "$stamp"
fi
# Point the editable install at this checkout (cheap; CI runs from a fresh clone elsewhere).
if ! "$VENV/bin/python" -P - "$PWD" <<'PY' 2>/dev/null
import pathlib, sys, pipelines
sys.exit(0 if pathlib.Path(pipelines.__file__).resolve().parent.parent == pathlib.Path(sys.argv[1]).resolve() else 1)
PY
then
    # built without isolation, with this venv's setuptools: pyproject.toml's build-system needs 77 or later
    "$VENV/bin/python" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' \
        || "$VENV/bin/pip" install -q --upgrade 'setuptools>=77'
    "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e . >"$CACHE/editable-install.log" 2>&1 || { cat "$CACHE/editable-install.log"; exit 1; }
fi

# Debian packages for the integration tests (Java for Kafka, openssl for its TLS listener, Prometheus, Alertmanager).
need=()
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v mvn >/dev/null 2>&1 || need+=(maven)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || [ -x /usr/bin/prometheus-alertmanager ] || need+=(prometheus-alertmanager)
# `docker compose config` validates deploy/docker-compose.yml (no engine needed); Debian ships the v1 client.
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: apt-get install ${need[*]}"
        apt-get -o DPkg::Lock::Timeout=300 update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends \
            "${need[@]}" >/dev/null
        # The Debian packages start services, enabled at boot on the ports docker-compose publishes (9090, 9093);
        # the tests run their own instances on other ports. Stopped and disabled; the fallback kills only the
        # service (its user, prometheus, and /usr/bin/prometheus matched exactly, not prometheus-alertmanager): the
        # tests' own instances run under the user who runs the tests.
        for svc in prometheus prometheus-alertmanager prometheus-node-exporter; do
            (systemctl disable --now "$svc" 2>/dev/null \
                || { service "$svc" stop && { update-rc.d "$svc" disable || true; }; } 2>/dev/null \
                || pkill -u prometheus -f "^/usr/bin/$svc( |\$)" 2>/dev/null) || true
        done
    else
        echo "setup: missing ${need[*]}; install them with: sudo apt-get install ${need[*]}" >&2
    fi
fi

# Kafka's jars from Maven Central, now rather than inside the first test's broker start.
if command -v java >/dev/null 2>&1 && command -v mvn >/dev/null 2>&1; then
    scripts/kafka.sh jars >"$CACHE/kafka-jars.log" 2>&1 || echo "setup: Kafka jars not fetched: $(tail -1 "$CACHE/kafka-jars.log")"
fi

# The fused CPU kernels of detector/fastpath.py are compiled once per machine (cached under $CACHE); build them
# here so that no test or daemon start waits for the compiler. Without a compiler the eager PyTorch path is used.
rm -f "$CACHE"/torch_extensions/*.failed  # a failed build is retried once per setup, not on every start
"$VENV/bin/python" -P -m detector.fastpath build >"$CACHE/fastpath-build.log" 2>&1 \
    || echo "setup: fused RNN extension not built (eager PyTorch is used): $(tail -1 "$CACHE/fastpath-build.log")"
"$VENV/bin/python" -P -m pipelines.native_decode build >"$CACHE/native-decode-build.log" 2>&1 \
    || echo "setup: native JSON decoder not built (decoding in Python): $(tail -1 "$CACHE/native-decode-build.log")"
