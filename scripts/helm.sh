#!/usr/bin/env bash
# Print the path of a pinned helm binary, building it with the Go toolchain on first use.
# Cached under ${ANOMALYD_CACHE:-~/.cache/anomalyd}/bin; later calls take milliseconds.
# Usage: scripts/helm.sh            -> prints the binary's path
#        scripts/helm.sh lint ...   -> runs helm with those arguments
set -euo pipefail
HELM_VERSION="${HELM_VERSION:-v3.21.4}"
CACHE="${ANOMALYD_CACHE:-$HOME/.cache/anomalyd}"
BIN_DIR="$CACHE/bin"
KUBE_MINOR=30  # the Kubernetes version helm assumes without --kube-version: 1.30, the tests' (the chart needs
               # >= 1.25; a released v3.21.4 assumes 1.36, its client-go's)
HELM="$BIN_DIR/helm-$HELM_VERSION-k8s1.$KUBE_MINOR"

if [ ! -x "$HELM" ]; then
    command -v go >/dev/null 2>&1 || { echo "helm.sh: the Go toolchain is needed to build helm $HELM_VERSION" >&2; exit 1; }
    mkdir -p "$BIN_DIR"
    tmp="$(mktemp -d "$BIN_DIR/.build.XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    echo "helm.sh: building helm $HELM_VERSION with $(go version) (first run only, a few minutes)" >&2
    # version stamps as helm's Makefile sets them: without them helm says "v3.21" and assumes Kubernetes 1.20,
    # below the chart's kubeVersion, so that `helm template` refused the chart unless given --kube-version
    flags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    for pkg in pkg/chartutil pkg/lint/rules; do
        flags="$flags -X helm.sh/helm/v3/$pkg.k8sVersionMajor=1 -X helm.sh/helm/v3/$pkg.k8sVersionMinor=$KUBE_MINOR"
    done
    GOBIN="$tmp" CGO_ENABLED=0 go install -ldflags "$flags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
    mv "$tmp/helm" "$HELM"   # atomic within the same directory: concurrent builds cannot leave a half-written binary
fi

if [ $# -eq 0 ]; then
    echo "$HELM"
else
    exec "$HELM" "$@"
fi
