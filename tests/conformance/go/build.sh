#!/usr/bin/env bash
# Builds the Go conformance peers (xds-client, grpc-backend) into ./bin/.
# Idempotent; fast when the Go build cache is warm.
set -euo pipefail
cd "$(dirname "$0")"
exec go build -mod=mod -buildvcs=false -o bin/ ./cmd/...
