"""A real, throw-away Kubernetes API (etcd + kube-apiserver) on loopback, envtest style.

    from kubeenv import KubeEnv
    with KubeEnv() as env:
        env.kubectl_json("POST", "/api/v1/namespaces", {"metadata": {"name": "t"}})
        print(env.kubeconfig, env.server)

No controller-manager or scheduler runs: nothing reconciles. Tests write the objects a
controller would (EndpointSlices, ...) themselves. The apiserver's own bootstrap still
creates the `default`/`kube-system` namespaces, RBAC roles, and the `kubernetes` Service
with its Endpoints/EndpointSlice in `default`.

Binaries:
  kube-apiserver  `apiserver_bin=` arg, else $KUBE_APISERVER_BIN, else the output of
                  tests/kube/build-apiserver.sh (instant when cached; a cold build takes
                  10-20 min). Set KUBEENV_NO_BUILD=1 to fail instead of building.
  etcd            `etcd_bin=` arg, else $ETCD_BIN, else `etcd` on PATH (Debian 3.4.23).

Certificates are made with the `openssl` CLI (stdlib only, no `cryptography`). Everything
lives in one temp dir (removed on exit unless keep_dir=True / $KUBEENV_KEEP=1):
  ca.crt ca.key            the CA (client CA and serving CA)
  apiserver.crt/.key       serving cert, SANs 127.0.0.1, ::1, localhost, 10.0.0.1, kubernetes*
  admin.crt/.key           client cert CN=tributary-admin, O=system:masters
  sa.key sa.pub            service-account signing key pair (RSA)
  kubeconfig               kubeconfig with embedded certs (context "tributary-test")
  etcd.log apiserver.log   process logs (tail attached to startup errors); the apiserver's
                           log level is `verbosity=` or $KUBEENV_V (4 logs every request)

Command line (for non-Python harnesses, e.g. Rust tests):
  python3 tests/kube/kubeenv.py serve
prints one JSON line {"server":..., "kubeconfig":..., "ca_file":..., ...} once ready, then
runs until stdin reaches EOF or it gets SIGTERM/SIGINT, and cleans up.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_SCRIPT = HERE / "build-apiserver.sh"

# Large enough for one cluster of the reference deployment's size (tens of thousands of
# Services, each with a ClusterIP): a /16 holds 65,534. The first address (10.0.0.1,
# the `kubernetes` Service) is in the serving certificate.
SERVICE_CIDR_V4 = "10.0.0.0/16"
# IPv6 service ranges may be at most /108 with the bitmap allocator (1,048,576 addresses).
SERVICE_CIDR_V6 = "fd00:10:96::/108"


class KubeEnvError(RuntimeError):
    pass


class KubeApiError(RuntimeError):
    """A non-2xx answer from the apiserver. `.status` is the HTTP code, `.body` the
    decoded body (usually a metav1.Status dict)."""

    def __init__(self, method: str, path: str, status: int, body: Any):
        self.method, self.path, self.status, self.body = method, path, status, body
        msg = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path} -> {status}: {msg}")


# ----------------------------------------------------------------------------- helpers

def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (small race until the user binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise KubeEnvError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def _set_pdeathsig() -> None:
    """Child pre-exec hook: get SIGTERM if the parent dies without cleaning up (Linux).
    Caveat: the signal fires when the *thread* that spawned the child exits, so start a
    KubeEnv from a thread that outlives it (the main thread, a pytest fixture)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def find_apiserver(build: bool = True) -> str:
    env = os.environ.get("KUBE_APISERVER_BIN")
    if env:
        return env
    if os.environ.get("KUBEENV_NO_BUILD") == "1":
        build = False
    # The script prints the cached path instantly when the binary exists.
    if not build:
        # Look for a cached build without building.
        cache = os.environ.get("KUBE_APISERVER_CACHE")
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tributary"
        candidates = [Path(cache) / "kube-apiserver"] if cache else sorted(
            default.glob("kube-apiserver-v*/kube-apiserver"), reverse=True)
        for c in candidates:
            if os.access(c, os.X_OK):
                return str(c)
        raise KubeEnvError("no kube-apiserver: run tests/kube/build-apiserver.sh or set KUBE_APISERVER_BIN")
    r = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise KubeEnvError(f"{BUILD_SCRIPT} failed (rc={r.returncode})")
    return lines[-1]


# ----------------------------------------------------------------------------- certs

def _openssl_req(d: Path, name: str, subj: str, ext: str, ca: bool = False) -> None:
    """EC P-256 key + cert signed by d/ca.* (or self-signed when ca=True)."""
    (d / f"{name}.ext").write_text(ext)
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
          "-out", str(key)], d)
    if ca:
        _run(["openssl", "req", "-x509", "-new", "-key", str(key), "-subj", subj, "-days", "3650",
              "-sha256", "-out", str(crt), "-extensions", "v3", "-config", str(d / f"{name}.ext")], d)
    else:
        csr = d / f"{name}.csr"
        _run(["openssl", "req", "-new", "-key", str(key), "-subj", subj, "-out", str(csr)], d)
        _run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(d / "ca.crt"),
              "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "3650", "-sha256",
              "-extfile", str(d / f"{name}.ext"), "-out", str(crt)], d)
        csr.unlink()


def make_certs(d: Path) -> None:
    # `openssl req -x509` needs a config with a [req] section; one file serves both.
    _openssl_req(d, "ca", "/CN=tributary-test-ca", ca=True, ext=(
        "[req]\ndistinguished_name=dn\n[dn]\n[v3]\n"
        "basicConstraints=critical,CA:TRUE\n"
        "keyUsage=critical,keyCertSign,cRLSign,digitalSignature\n"
        "subjectKeyIdentifier=hash\n"))
    _openssl_req(d, "apiserver", "/CN=kube-apiserver", ext=(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,IP:::1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"))
    _openssl_req(d, "admin", "/O=system:masters/CN=tributary-admin", ext=(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n"))
    # Service-account token signing pair (RS256).
    _run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
          "-out", str(d / "sa.key")], d)
    _run(["openssl", "pkey", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")], d)
    for f in d.glob("*.key"):
        f.chmod(0o600)


# ----------------------------------------------------------------------------- watch

class Watch:
    """A streaming watch; iterate or call next_event(timeout). Close when done."""

    def __init__(self, conn: http.client.HTTPSConnection, resp: http.client.HTTPResponse):
        self._conn, self._resp = conn, resp

    def next_event(self, timeout: float = 10.0) -> Optional[dict]:
        """The next {"type": ..., "object": ...} event; None when the server ended the
        stream; raises TimeoutError if nothing arrived within `timeout` seconds (the
        watch is unusable afterwards)."""
        if self._conn.sock is None:
            return None
        self._conn.sock.settimeout(timeout)
        try:
            line = self._resp.readline()
        except (socket.timeout, TimeoutError) as e:
            self.close()
            raise TimeoutError(f"no watch event within {timeout}s") from e
        if not line:
            return None
        return json.loads(line)

    def __iter__(self) -> Iterator[dict]:
        while True:
            ev = self.next_event(timeout=3600)
            if ev is None:
                return
            yield ev

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._resp.close()
        with contextlib.suppress(Exception):
            self._conn.close()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------- env

class KubeEnv:
    """etcd + kube-apiserver on 127.0.0.1 with free ports. Use as a context manager, or
    call start()/stop()."""

    def __init__(self, *, apiserver_bin: Optional[str] = None, etcd_bin: Optional[str] = None,
                 dual_stack: bool = True, extra_apiserver_args: Optional[list[str]] = None,
                 start_timeout: float = 90.0, keep_dir: Optional[bool] = None,
                 verbosity: int = 0):
        self.apiserver_bin = apiserver_bin
        self.etcd_bin = etcd_bin or os.environ.get("ETCD_BIN") or shutil.which("etcd")
        self.dual_stack = dual_stack
        self.extra_apiserver_args = list(extra_apiserver_args or [])
        self.start_timeout = start_timeout
        self.keep_dir = keep_dir if keep_dir is not None else os.environ.get("KUBEENV_KEEP") == "1"
        self.verbosity = verbosity or int(os.environ.get("KUBEENV_V", "0"))
        self.dir: Optional[Path] = None
        self.etcd_proc: Optional[subprocess.Popen] = None
        self.apiserver_proc: Optional[subprocess.Popen] = None
        self.etcd_url = ""
        self.port = 0
        self.server = ""          # https://127.0.0.1:PORT
        self.kubeconfig = ""      # path of the kubeconfig file
        self.ca_file = self.client_cert = self.client_key = ""
        self._ssl: Optional[ssl.SSLContext] = None

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> "KubeEnv":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> "KubeEnv":
        if not self.etcd_bin:
            raise KubeEnvError("etcd not found (apt-get install etcd-server, or set ETCD_BIN)")
        if not self.apiserver_bin:
            self.apiserver_bin = find_apiserver()
        if not shutil.which("openssl"):
            raise KubeEnvError("openssl CLI not found")
        self.dir = Path(tempfile.mkdtemp(prefix="kubeenv-"))
        try:
            make_certs(self.dir)
            self.ca_file = str(self.dir / "ca.crt")
            self.client_cert = str(self.dir / "admin.crt")
            self.client_key = str(self.dir / "admin.key")
            ctx = ssl.create_default_context(cafile=self.ca_file)
            ctx.load_cert_chain(self.client_cert, self.client_key)
            self._ssl = ctx
            # Ports are picked free but can race with other processes: retry on bind errors.
            for attempt in range(3):
                try:
                    self._start_etcd()
                    self._start_apiserver()
                    break
                except _PortInUse:
                    self._stop_procs()
                    if attempt == 2:
                        raise KubeEnvError("could not find free ports after 3 attempts")
            self._write_kubeconfig()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._stop_procs()
        if self.dir and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def _stop_procs(self) -> None:
        # apiserver first so it does not spin on a vanished etcd.
        for attr in ("apiserver_proc", "etcd_proc"):
            p: Optional[subprocess.Popen] = getattr(self, attr)
            if p is None:
                continue
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
            setattr(self, attr, None)

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as f:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                    cwd=self.dir, preexec_fn=_set_pdeathsig)

    def _start_etcd(self) -> None:
        assert self.dir is not None
        cport, pport = _free_ports(2)
        data = self.dir / "etcd-data"
        shutil.rmtree(data, ignore_errors=True)
        self.etcd_url = f"http://127.0.0.1:{cport}"
        peer = f"http://127.0.0.1:{pport}"
        log = self.dir / "etcd.log"
        self.etcd_proc = self._spawn([
            self.etcd_bin, "--name", "kubeenv", "--data-dir", str(data),
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"kubeenv={peer}", "--initial-cluster-state", "new",
            "--logger", "zap", "--log-outputs", "stderr",
            # Small and fast: no need for large snapshots in tests.
            "--snapshot-count", "10000", "--quota-backend-bytes", str(2 * 1024 ** 3),
        ], log)
        deadline = time.monotonic() + 30
        while True:
            if self.etcd_proc.poll() is not None:
                tail = _tail(log)
                if "address already in use" in tail:
                    raise _PortInUse()
                raise KubeEnvError(f"etcd exited ({self.etcd_proc.returncode}):\n{tail}")
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                c = http.client.HTTPConnection("127.0.0.1", cport, timeout=2)
                c.request("GET", "/health")
                r = c.getresponse()
                body = r.read()
                c.close()
                if r.status == 200 and json.loads(body).get("health") == "true":
                    return
            if time.monotonic() > deadline:
                raise KubeEnvError(f"etcd not healthy within 30s:\n{_tail(log)}")
            time.sleep(0.1)

    def apiserver_args(self) -> list[str]:
        assert self.dir is not None
        d = self.dir
        cidr = SERVICE_CIDR_V4 + ("," + SERVICE_CIDR_V6 if self.dual_stack else "")
        return [
            f"--etcd-servers={self.etcd_url}",
            f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.crt'}",
            f"--secure-port={self.port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--service-cluster-ip-range={cidr}",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            "--allow-privileged=true",
            f"--service-account-issuer=https://127.0.0.1:{self.port}/",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            # The `kubernetes` Service's Endpoints would hold the advertise address, and
            # 127.0.0.1 fails validation (loopback): the default reconciler logs an error
            # every 10s. Skip it; the Service itself is still created.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            f"--v={self.verbosity}",
            *self.extra_apiserver_args,
        ]

    def _start_apiserver(self) -> None:
        assert self.dir is not None and self.apiserver_bin
        self.port = free_port()
        self.server = f"https://127.0.0.1:{self.port}"
        log = self.dir / "apiserver.log"
        self.apiserver_proc = self._spawn([self.apiserver_bin, *self.apiserver_args()], log)
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while True:
            if self.apiserver_proc.poll() is not None:
                tail = _tail(log)
                if "address already in use" in tail:
                    raise _PortInUse()
                raise KubeEnvError(f"kube-apiserver exited ({self.apiserver_proc.returncode}):\n{tail}")
            try:
                status, body = self.request("GET", "/readyz", timeout=5)
                last = f"{status} {body!r}"[:500]
                if status == 200 and body == "ok":
                    break
            except (OSError, http.client.HTTPException) as e:
                last = repr(e)
            if time.monotonic() > deadline:
                raise KubeEnvError(f"kube-apiserver not ready within {self.start_timeout}s "
                                   f"(last /readyz: {last}):\n{_tail(log)}")
            time.sleep(0.2)
        # /readyz does not cover the bootstrap controller's namespaces; wait for them too
        # so tests can rely on `default` existing.
        while time.monotonic() < deadline:
            status, _ = self.request("GET", "/api/v1/namespaces/default")
            if status == 200:
                return
            time.sleep(0.2)
        raise KubeEnvError("namespace 'default' never appeared")

    def _write_kubeconfig(self) -> None:
        assert self.dir is not None

        def b64(p: str) -> str:
            return base64.b64encode(Path(p).read_bytes()).decode()

        # JSON is valid YAML, so every kubeconfig reader accepts it.
        cfg = {
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": "tributary-test", "cluster": {
                "server": self.server, "certificate-authority-data": b64(self.ca_file)}}],
            "users": [{"name": "tributary-admin", "user": {
                "client-certificate-data": b64(self.client_cert),
                "client-key-data": b64(self.client_key)}}],
            "contexts": [{"name": "tributary-test", "context": {
                "cluster": "tributary-test", "user": "tributary-admin", "namespace": "default"}}],
            "current-context": "tributary-test",
        }
        path = self.dir / "kubeconfig"
        path.write_text(json.dumps(cfg, indent=2) + "\n")
        path.chmod(0o600)
        self.kubeconfig = str(path)

    def info(self) -> dict:
        return {"server": self.server, "kubeconfig": self.kubeconfig, "ca_file": self.ca_file,
                "client_cert": self.client_cert, "client_key": self.client_key,
                "etcd": self.etcd_url, "dir": str(self.dir),
                "apiserver_pid": self.apiserver_proc.pid if self.apiserver_proc else None,
                "etcd_pid": self.etcd_proc.pid if self.etcd_proc else None}

    # -- REST ------------------------------------------------------------------------

    def _conn(self, timeout: float) -> http.client.HTTPSConnection:
        if self._ssl is None or not self.port:
            raise KubeEnvError("KubeEnv not started")
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ssl, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, *, content_type: Optional[str] = None,
                timeout: float = 30.0) -> tuple[int, Any]:
        """Raw call: returns (status, body) with body JSON-decoded when possible (str
        otherwise). `body` may be a dict/list (sent as JSON), str or bytes. PATCH defaults
        to application/merge-patch+json."""
        data: Optional[bytes]
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = content_type or (
                "application/merge-patch+json" if method.upper() == "PATCH" else "application/json")
        c = self._conn(timeout)
        try:
            c.request(method.upper(), path, body=data, headers=headers)
            r = c.getresponse()
            raw = r.read()
        finally:
            c.close()
        text = raw.decode(errors="replace")
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text

    def kubectl_json(self, method: str, path: str, body: Any = None, *,
                     content_type: Optional[str] = None, timeout: float = 30.0) -> Any:
        """REST call with the system:masters client cert; returns the decoded JSON body,
        raises KubeApiError on a non-2xx status.

        kubectl_json("GET", "/api/v1/namespaces/default/services/kubernetes")
        kubectl_json("PATCH", path, {"metadata": {"labels": {"a": "b"}}})          # merge patch
        kubectl_json("PATCH", path + "?fieldManager=t", obj, content_type="application/apply-patch+yaml")
        """
        status, out = self.request(method, path, body, content_type=content_type, timeout=timeout)
        if not 200 <= status < 300:
            raise KubeApiError(method.upper(), path, status, out)
        return out

    def watch(self, path: str, resource_version: Optional[str] = None, *,
              timeout_seconds: int = 300, allow_bookmarks: bool = False,
              connect_timeout: float = 30.0) -> Watch:
        """Start a watch on a collection path (e.g. "/apis/discovery.k8s.io/v1/namespaces/ns/
        endpointslices"); query parameters already in `path` are kept."""
        q: dict[str, str] = {"watch": "1", "timeoutSeconds": str(timeout_seconds)}
        if resource_version is not None:
            q["resourceVersion"] = str(resource_version)
        if allow_bookmarks:
            q["allowWatchBookmarks"] = "true"
        sep = "&" if "?" in path else "?"
        full = path + sep + urllib.parse.urlencode(q)
        c = self._conn(connect_timeout)
        c.request("GET", full, headers={"Accept": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raw = r.read().decode(errors="replace")
            c.close()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw
            raise KubeApiError("WATCH", full, r.status, body)
        return Watch(c, r)


class _PortInUse(Exception):
    pass


# ----------------------------------------------------------------------------- CLI

def _serve() -> int:
    def on_signal(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        with KubeEnv() as env:
            print(json.dumps(env.info()), flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                sys.stdin.read()  # until EOF (the harness closes our stdin or kills us)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        sys.exit(_serve())
    if sys.argv[1:] == ["build"]:
        print(find_apiserver())
        sys.exit(0)
    print(__doc__)
    print("usage: kubeenv.py serve | build", file=sys.stderr)
    sys.exit(2)
