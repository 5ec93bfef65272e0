#!/usr/bin/env python3
"""A proxyless gRPC (grpcio, xDS) client run as a subprocess by the conformance tests.

grpcio caches its xDS client per process, so every scenario runs its own process with
its own GRPC_XDS_BOOTSTRAP.

One-shot:     grpc_client.py -target xds:///greeter.prod:50051 -count 100 [-metadata k=v]
Interactive:  grpc_client.py -target ... -interactive
              then one JSON command per stdin line:
                {"count": 20, "method": "/x.Y/Z", "metadata": {"k": "v"}}
              answered by one JSON line each. EOF ends the process.

Output (per run): {"counts": {"<x-backend-id>": n}, "errors": n, "first_error": "..."}
"""

import argparse
import json
import sys
import time

import grpc

DEFAULT_METHOD = "/grpc.testing.TestService/UnaryCall"


def run(channel, method, count, metadata, wait, state):
    call = channel.unary_unary(method)  # raw bytes in and out
    counts, errors, first_error = {}, 0, None
    for _ in range(count):
        # Until the first success, wait for xDS resolution (wait_for_ready, long deadline).
        timeout = wait if not state["ok"] else 5.0
        try:
            _, c = call.with_call(b"", metadata=metadata, timeout=timeout, wait_for_ready=True)
            state["ok"] = True
            md = dict(c.initial_metadata() or ())
            bid = md.get("x-backend-id", "<none>")
            counts[bid] = counts.get(bid, 0) + 1
        except grpc.RpcError as e:
            errors += 1
            if first_error is None:
                first_error = f"{e.code().name}: {e.details()}"
            if errors >= 10:
                break
    return {"counts": counts, "errors": errors, "first_error": first_error}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-target", "--target", required=True)
    ap.add_argument("-method", "--method", default=DEFAULT_METHOD)
    ap.add_argument("-count", "--count", type=int, default=1)
    ap.add_argument("-metadata", "--metadata", action="append", default=[])
    ap.add_argument("-wait", "--wait", type=float, default=30.0)
    ap.add_argument("-interactive", "--interactive", action="store_true")
    a = ap.parse_args()

    md = tuple(tuple(kv.split("=", 1)) for kv in a.metadata)
    channel = grpc.insecure_channel(a.target)
    state = {"ok": False}
    if not a.interactive:
        print(json.dumps(run(channel, a.method, a.count, md, a.wait, state)), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        t0 = time.monotonic()
        out = run(channel, cmd.get("method", a.method), int(cmd.get("count", 1)),
                  tuple((cmd.get("metadata") or {}).items()), float(cmd.get("wait", a.wait)), state)
        out["elapsed"] = time.monotonic() - t0
        print(json.dumps(out), flush=True)
    channel.close()


if __name__ == "__main__":
    main()
