#!/usr/bin/env bash
# Regenerates controlpb/ from control.proto (needs protoc; protoc-gen-go comes from the
# module cache through go run). The output is checked in, so build.sh needs neither.
set -euo pipefail
cd "$(dirname "$0")"
plugin="$(mktemp -d)"
trap 'rm -rf "$plugin"' EXIT
go build -o "$plugin/protoc-gen-go" google.golang.org/protobuf/cmd/protoc-gen-go
protoc --plugin=protoc-gen-go="$plugin/protoc-gen-go" --go_out=. --go_opt=module=tributary.test/gcppeer control.proto
