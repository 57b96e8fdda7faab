#!/usr/bin/env bash
# Packs what the Kafka benchmarks need on a machine that has a GPU but no Java, no Kafka and no network (the lent
# device machine of the developers' workplace): a trimmed Java 17 runtime (jlink), the broker's jars from this
# machine's cache (native libraries for other platforms removed), and the Python wheels anomalyd needs beside
# torch/numpy (kafka-python, crc32c, confluent-kafka, orjson) for CPython 3.12 on x86-64 Linux.
#
#   bash benchmarks/device_bundle.sh [OUT_DIR]        # default .device-bundle (git-ignored through info/exclude)
#
# On the GPU machine, from the repository root, `bash benchmarks/device_bundle.sh --unpack DIR` unpacks into
# /tmp/anomalyd-device and prints the environment to export (JAVA_HOME, ANOMALYD_CACHE, PYTHONPATH); then e.g.
# `python3 -m benchmarks.pipeline --device cuda`. Needs here: a JDK 17 (jlink), `make test` or `make demo` run
# once (the Kafka jars in the cache), pip.
set -euo pipefail

CACHE="${ANOMALYD_CACHE:-$HOME/.cache/anomalyd}"
KAFKA_DIR="kafka-4.1.2"  # pipelines/kafka_local.py KAFKA_VERSION
# jdeps over the broker's jars, plus what reflection loads (log4j needs java.beans, in java.desktop)
MODULES=java.base,java.desktop,java.logging,java.management,java.naming,java.net.http,java.scripting,\
java.security.jgss,java.security.sasl,java.sql,java.xml,jdk.management,jdk.unsupported

if [[ "${1:-}" == "--unpack" ]]; then
  src="${2:?--unpack DIR}"
  dest=/tmp/anomalyd-device
  mkdir -p "$dest/cache" "$dest/site"
  tar -C "$dest" -xJf "$src/jre.tar.xz"
  tar -C "$dest/cache" -xf "$src/kafka.tar"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dest/site" \
    "$src"/*.whl >&2
  echo "export JAVA_HOME=$dest/jre ANOMALYD_CACHE=$dest/cache PYTHONPATH=$dest/site"
  exit 0
fi

out="${1:-.device-bundle}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# uncompressed modules: xz packs them to half of what jlink's own compression gives (17 MB against 30)
jlink --add-modules "$MODULES" --strip-debug --no-header-files --no-man-pages --compress=0 --output "$work/jre"
rm -f "$work"/jre/lib/{libawt_xawt,libmlib_image,libjsound,libfontmanager,libsplashscreen,libjavajpeg,liblcms,libjawt}.so
tar -C "$work" -cf - jre | xz -T0 -9 >"$out/jre.tar.xz"

libs="$CACHE/$KAFKA_DIR/libs"
[[ -f "$libs/.complete" ]] || { echo "no Kafka jars in $libs: run 'make test' or 'make demo' once" >&2; exit 1; }
mkdir -p "$work/kafka/$KAFKA_DIR"
cp -a "$libs" "$work/kafka/$KAFKA_DIR/libs"
cp "$CACHE/$KAFKA_DIR/pom.xml" "$work/kafka/$KAFKA_DIR/"
(  # drop the native libraries of other platforms (zstd-jni, snappy): 9 MB of 43
  cd "$work/kafka/$KAFKA_DIR/libs"
  for jar in zstd-jni-*.jar; do
    zip -q -d "$jar" $(unzip -Z1 "$jar" | grep -E '\.(so|dll|dylib)$' | grep -v '^linux/amd64/') || true
  done
  for jar in snappy-java-*.jar; do
    zip -q -d "$jar" $(unzip -Z1 "$jar" | grep -E '/native/.*\.(so|dll|jnilib|dylib|a)$' | grep -v '/Linux/x86_64/') || true
  done
)
tar -C "$work/kafka" -cf "$out/kafka.tar" "$KAFKA_DIR"

rm -f "$out"/*.whl
venv_pip="$CACHE/venv/bin/pip"
version() { "$venv_pip" show "$1" 2>/dev/null | awk '/^Version/{print $2}'; }
python3 -m pip download -q --no-deps --only-binary=:all: -d "$out" "kafka-python==$(version kafka-python)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d "$out" \
  "crc32c==$(version crc32c)" "confluent-kafka==$(version confluent-kafka)" "orjson==$(version orjson)"
du -sh "$out"/* >&2
