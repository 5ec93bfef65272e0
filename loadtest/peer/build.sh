#!/usr/bin/env bash
# Build the go-control-plane peer used by the load-test harness: bin/gcp-peer
set -euo pipefail
cd "$(dirname "$0")"
exec go build -trimpath -o bin/gcp-peer .
