#!/usr/bin/env bash
# Build a real kube-apiserver (k8s.io/kubernetes v1.30.x) from the Go module proxy.
#
# The wrapper module in tests/kube/apiserver requires k8s.io/kubernetes and replaces
# each k8s.io/<staging> module (required there at v0.0.0) with the published v0.30.x.
# 1.30 is the newest minor that works with Debian's etcd 3.4.23 (1.31+ wants >= 3.4.31).
#
# Usage:   tests/kube/build-apiserver.sh            # last stdout line = binary path
# Env:     KUBE_APISERVER_CACHE  output dir (default ~/.cache/tributary/kube-apiserver-<ver>)
#          GOMODCACHE / GOCACHE / GOFLAGS / GOPROXY are honoured as set.
#          KUBE_APISERVER_REBUILD=1 forces a rebuild.
# Cached:  if $KUBE_APISERVER_CACHE/kube-apiserver exists and is executable, nothing is built.
# Cold build: ~1-2 min module download + 10-20 min compile on 2 cores.
#
# To move to another patch release: edit the version in apiserver/go.mod (require and
# every replace), then `cd tests/kube/apiserver && go mod tidy`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MOD_DIR="$HERE/apiserver"
REPO="$(cd "$HERE/../.." && pwd)"

# The kubernetes version is whatever the wrapper module requires.
K8S_VERSION="$(sed -n 's/^require k8s.io\/kubernetes \(v[0-9.]*\).*/\1/p' "$MOD_DIR/go.mod")"
if [[ -z "$K8S_VERSION" ]]; then
  echo "build-apiserver.sh: cannot find 'require k8s.io/kubernetes vX' in $MOD_DIR/go.mod" >&2
  exit 1
fi

# Outside the repository, so fresh clones on the same machine (CI) reuse the build.
CACHE="${KUBE_APISERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tributary/kube-apiserver-$K8S_VERSION}"
BIN="$CACHE/kube-apiserver"

if [[ -x "$BIN" && "${KUBE_APISERVER_REBUILD:-0}" != 1 ]]; then
  echo "$BIN"
  exit 0
fi

command -v go >/dev/null || { echo "build-apiserver.sh: 'go' not on PATH" >&2; exit 1; }
mkdir -p "$CACHE"

echo "build-apiserver.sh: building kube-apiserver $K8S_VERSION into $CACHE (this takes a while)" >&2
start=$(date +%s)
TMP_BIN="$(mktemp "$CACHE/.kube-apiserver.XXXXXX")"
trap 'rm -f "$TMP_BIN"' EXIT
(
  cd "$MOD_DIR"
  # CGO off: a static binary, no C toolchain needed. -mod=readonly: never rewrite go.mod.
  # The -X flags fill in `kube-apiserver --version` / the /version endpoint.
  CGO_ENABLED=0 go build -mod=readonly -trimpath \
    -ldflags "-s -w \
      -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
      -X k8s.io/component-base/version.gitMajor=1 \
      -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) \
      -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION" \
    -o "$TMP_BIN" k8s.io/kubernetes/cmd/kube-apiserver
) >&2
chmod +x "$TMP_BIN"
mv -f "$TMP_BIN" "$BIN"   # atomic: a half-written binary is never seen as cached
trap - EXIT
echo "build-apiserver.sh: built in $(( $(date +%s) - start ))s ($(du -h "$BIN" | cut -f1))" >&2
echo "$BIN"
