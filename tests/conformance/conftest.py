"""Fixtures for the Tributary conformance suite: a real hub, real Envoys, real gRPC
clients (Python grpcio and Go), and loopback backends. See README.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from peers import (  # noqa: E402
    FAMILIES, Envoy, GrpcBackend, HttpBackend, Hub, Proc, grpc_bootstrap, hub_binary,
)

HERE = Path(__file__).resolve().parent
GO_DIR = HERE / "go"
GO_CLIENT = GO_DIR / "bin" / "xds-client"


# ---------------------------------------------------------- logs of failed tests


@pytest.fixture(autouse=True)
def _log_registry():
    peers.LOG_REGISTRY.clear()
    yield
    peers.LOG_REGISTRY.clear()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when in ("setup", "call") and rep.failed:
        for name, path in list(peers.LOG_REGISTRY):
            rep.sections.append((f"{name} ({path})", peers.tail(Path(path), 80)))


# ------------------------------------------------------------------------ binaries


@pytest.fixture(scope="session")
def hub_bin() -> Path:
    b = hub_binary()
    if not b.exists():
        pytest.fail(f"hub binary {b} missing: run `cargo build -p tributary-controlplane` first "
                    "(or set TRIBUTARY_BIN)", pytrace=False)
    out = subprocess.run([str(b), "hub", "--help"], capture_output=True, text=True, timeout=20)
    if "--ready-file" not in out.stdout + out.stderr:
        pytest.fail(f"{b} hub --help does not show --ready-file; binary too old?\n{out.stdout}{out.stderr}",
                    pytrace=False)
    return b


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    try:
        return peers.envoy_binary()
    except AssertionError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def go_client() -> Path:
    if not GO_CLIENT.exists():
        build = GO_DIR / "build.sh"
        if not build.exists():
            pytest.fail(f"Go client {GO_CLIENT} missing and {build} does not exist", pytrace=False)
        r = subprocess.run(["bash", str(build)], cwd=GO_DIR, capture_output=True, text=True, timeout=900)
        if r.returncode != 0 or not GO_CLIENT.exists():
            pytest.fail(f"building the Go client failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}",
                        pytrace=False)
    return GO_CLIENT


# ------------------------------------------------------------------------ factories


@pytest.fixture
def make_hub(tmp_path, hub_bin):
    hubs: list[Hub] = []

    def make(family: str = "ipv4", docs: list[dict] | None = None, poll_interval: str = "100ms",
             xds_port: int = 0, extra_args: list[str] | None = None) -> Hub:
        h = Hub(tmp_path / f"h{len(hubs)}", family=family, poll_interval=poll_interval, xds_port=xds_port,
                extra_args=extra_args or ())
        if docs is not None:
            h.write_config(docs)
        hubs.append(h)
        h.start()
        return h

    yield make
    for h in hubs:
        h.stop()


@pytest.fixture
def make_envoy(tmp_path, envoy_bin):
    envoys: list[Envoy] = []

    def make(hub: Hub, api_type: str, node_id: str | None = None, **kw) -> Envoy:
        e = Envoy(tmp_path, hub, api_type, node_id or f"envoy-{len(envoys)}", **kw)
        envoys.append(e)
        e.start()
        return e

    yield make
    for e in envoys:
        e.stop()


@pytest.fixture
def make_http_backend():
    backends: list[HttpBackend] = []

    def make(backend_id: str, family: str = "ipv4") -> HttpBackend:
        b = HttpBackend(backend_id, FAMILIES[family])
        backends.append(b)
        return b

    yield make
    for b in backends:
        b.stop()


@pytest.fixture
def make_grpc_backend():
    backends: list[GrpcBackend] = []

    def make(backend_id: str, family: str = "ipv4") -> GrpcBackend:
        b = GrpcBackend(backend_id, FAMILIES[family])
        backends.append(b)
        return b

    yield make
    for b in backends:
        b.stop()


class PyGrpcClient:
    """An interactive grpc_client.py subprocess (one xDS client per process)."""

    def __init__(self, proc: Proc):
        self.proc = proc

    def run(self, count: int, method: str | None = None, metadata: dict | None = None,
            wait: float = 30.0) -> dict:
        cmd = {"count": count, "metadata": metadata or {}, "wait": wait}
        if method:
            cmd["method"] = method
        p = self.proc.p
        p.stdin.write((json.dumps(cmd) + "\n").encode())
        p.stdin.flush()
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"grpc_client.py exited ({p.poll()}):\n{peers.tail(self.proc.log, 40)}")
        return json.loads(line)


@pytest.fixture
def make_py_grpc_client(tmp_path):
    clients: list[PyGrpcClient] = []

    def make(hub: Hub, target: str, node_id: str | None = None, node_env: str = peers.ENV,
             tls: tuple[Path, Path, Path] | None = None) -> PyGrpcClient:
        """`node_env`: the environment its node metadata claims; `tls`: its certificate,
        key and trust bundle (mutual TLS to the hub)."""
        node_id = node_id or f"py-{len(clients)}"
        boot = grpc_bootstrap(tmp_path / f"{node_id}-bootstrap.json", hub, node_id,
                              env=node_env, tls=tls)
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP=str(boot), GRPC_VERBOSITY="ERROR")
        proc = Proc(f"grpc-python {node_id}",
                    [sys.executable, "-u", str(HERE / "grpc_client.py"), "-target", target, "-interactive"],
                    tmp_path / f"{node_id}.log", env=env, stdin=subprocess.PIPE, stdout_pipe=True)
        c = PyGrpcClient(proc)
        line = proc.p.stdout.readline()
        assert line and json.loads(line).get("ready"), \
            f"grpc_client.py did not start:\n{peers.tail(proc.log, 40)}"
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.proc.stop()


@pytest.fixture
def run_go_client(tmp_path, go_client):
    """Runs the Go xds-client once; returns its parsed JSON output."""
    n = [0]

    def run(hub: Hub, target: str, count: int, method: str | None = None,
            metadata: dict | None = None, wait: str = "30s") -> dict:
        n[0] += 1
        node_id = f"go-{n[0]}"
        boot = grpc_bootstrap(tmp_path / f"{node_id}-bootstrap.json", hub, node_id)
        argv = [str(go_client), "-target", target, "-count", str(count), "-wait", wait]
        if method:
            argv += ["-method", method]
        for k, v in (metadata or {}).items():
            argv += ["-metadata", f"{k}={v}"]
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP=str(boot))
        log = tmp_path / f"{node_id}.log"
        proc = Proc(f"grpc-go {node_id}", argv, log, env=env, stdout_pipe=True)
        try:
            out, _ = proc.p.communicate(timeout=120)
        finally:
            proc.stop()
        assert proc.p.returncode == 0 or out, \
            f"xds-client exited {proc.p.returncode} without output:\n{peers.tail(log, 40)}"
        try:
            return json.loads(out.decode().strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            raise AssertionError(f"xds-client printed no JSON: {out!r}\n{peers.tail(log, 40)}") from None

    return run


def pytest_configure(config):
    config.addinivalue_line("markers", "envoy: tests that run Envoy")


@pytest.fixture(params=["GRPC", "DELTA_GRPC"])
def api_type(request):
    """The xDS transport a peer speaks: State of the World or Delta ADS."""
    return request.param


@pytest.fixture(params=["ipv4", "ipv6"])
def family(request):
    """The address family every process of a test binds and connects on."""
    return request.param
