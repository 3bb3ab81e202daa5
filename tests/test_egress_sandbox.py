"""Egress from inside the `full` sandbox, for real, as root through `apply` (issue 5): the sandbox's only
way out is the listener the launch handed to the engine's proxy. Every address dialled is on this
machine: an HTTP server the test runs on the host's loopback, and names refused before any lookup."""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from faramesh.engine.paths import stack_paths
from test_apply import Applied, new_applied
from test_supervisor import _teardown, _wait

IS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not IS_ROOT, reason="apply launches agents under their own uids")

AGENT_PY = r"""
import json, os, socket, subprocess, urllib.error, urllib.request
PORT = int(os.environ["FM_UPSTREAM_PORT"]) if "FM_UPSTREAM_PORT" in os.environ else %(port)d
out = {"env": {k: os.environ.get(k) for k in ("HTTP_PROXY", "https_proxy", "NO_PROXY", "FARAMESH_PROXY_PORT")}}

def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode(errors="replace")]
    except OSError as e:
        return ["error", repr(e)]

out["allowed"] = fetch(f"http://127.0.0.1:{PORT}/ok")
out["denied"] = fetch("http://denied.example.test/")
out["port_not_allowed"] = fetch(f"http://127.0.0.1:{PORT + 1}/")
out["keepalive_second_denied"] = fetch("http://other.example.test/x")

def direct(family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(addr)
        return "CONNECTED"
    except OSError as e:
        return e.errno
    finally:
        s.close()

out["direct_loopback"] = direct(socket.AF_INET, ("127.0.0.1", PORT))
out["direct_host"] = direct(socket.AF_INET, (%(host_ip)r, PORT))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"x", (%(host_ip)r, PORT))
    out["udp"] = "SENT"
except OSError as e:
    out["udp"] = e.errno
try:
    l = socket.socket(); l.bind(("127.0.0.1", int(os.environ["FARAMESH_PROXY_PORT"]))); out["rebind"] = "BOUND"
except OSError as e:
    out["rebind"] = e.errno
import http.client, ssl
TLS = %(tls_port)d
ctx = ssl.create_default_context(cafile=%(cafile)r)
try:
    with urllib.request.urlopen(f"https://127.0.0.1:{TLS}/tls", timeout=10, context=ctx) as r:
        out["https"] = [r.status, r.read().decode()]
except OSError as e:
    out["https"] = ["error", repr(e)]
conn = http.client.HTTPConnection("127.0.0.1", 3128, timeout=10)
conn.set_tunnel("127.0.0.1", 22)
try:
    conn.connect()
    out["connect_22"] = "TUNNEL"
except OSError as e:
    out["connect_22"] = str(e)
try:
    socket.getaddrinfo("example.com", 443)
    out["dns"] = "RESOLVED"
except socket.gaierror as e:
    out["dns"] = "gaierror"
if os.path.exists("/usr/bin/curl"):
    p = subprocess.run(["/usr/bin/curl", "-s", "--cacert", %(cafile)r, f"https://127.0.0.1:{TLS}/curl-tls"],
                       capture_output=True, text=True, timeout=20)
    out["curl_tls"] = p.stdout
if os.path.exists("/usr/bin/curl"):
    p = subprocess.run(["/usr/bin/curl", "-s", "-o", "-", "-w", " %%{http_code}", f"http://127.0.0.1:{PORT}/curl"],
                       capture_output=True, text=True, timeout=20)
    out["curl"] = p.stdout
with open("egress.json.tmp", "w") as fh:
    json.dump(out, fh)
os.rename("egress.json.tmp", "egress.json")
import time
time.sleep(3600)
"""

POLICY = """\
runtime {
  backend = "sqlite"
  cold_start_deny_window = "5s"
}

agent "bot" {
  command = "/usr/bin/python3 '%(agent)s'"
  default deny
  rules {
    permit search
  }
  egress { allow = ["127.0.0.1:%(port)d", "127.0.0.1:%(tls_port)d"] }
}
"""


class _Upstream(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Upstream.seen.append(self.path)
        body = f"hello-from-upstream {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _host_ip() -> str:
    """This machine's own non-loopback address (the sandbox must fail to reach it; the host never dials it)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True,
                         timeout=5).stdout
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return "127.0.0.2"  # none: a loopback address outside the sandbox is as unreachable from inside


def _tls_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """A self-signed certificate for 127.0.0.1 (the agent trusts it through `cafile`)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(cert_path, 0o644)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


@pytest.fixture(scope="module")
def egress() -> Iterator[tuple[Applied, dict[str, Any], int]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    a = new_applied("faramesh-egress-")
    cafile = a.stack / "ca.pem"
    tls = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    tls.socket = _tls_context(cafile, a.base / "key.pem").wrap_socket(tls.socket, server_side=True)
    tls_port = tls.server_address[1]
    threading.Thread(target=tls.serve_forever, daemon=True).start()
    values = {"port": port, "tls_port": tls_port, "host_ip": _host_ip(), "cafile": str(cafile)}
    (a.stack / "agent.py").write_text(AGENT_PY % values)
    os.chmod(a.stack / "agent.py", 0o644)
    (a.stack / "governance.fms").write_text(POLICY % {"agent": a.stack / "agent.py", **values})
    try:
        proc = a.faramesh("apply")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "S3 egress: 127.0.0.1:3128 is the engine's proxy" in proc.stdout, proc.stdout
        result = a.stack / "workspace" / "egress.json"
        _wait(result.exists, timeout=60)
        yield a, json.loads(result.read_text()), port
    finally:
        _teardown(a)
        server.shutdown()
        tls.shutdown()


def _egress_records(a: Applied) -> list[dict[str, Any]]:
    from faramesh.engine.wal.store import SqliteReader

    wal = stack_paths(a.stack, env=a.env).wal_path(None)
    with SqliteReader(wal) as reader:
        bodies = [json.loads(r.body) for r in reader.records()]
    return [b for b in bodies if b.get("action_type") == "egress"]


def test_the_proxy_variables_point_at_the_handed_over_listener(egress: tuple[Applied, dict[str, Any], int]) -> None:
    _, out, _ = egress
    assert out["env"] == {"HTTP_PROXY": "http://127.0.0.1:3128", "https_proxy": "http://127.0.0.1:3128",
                          "NO_PROXY": "", "FARAMESH_PROXY_PORT": "3128"}  # fmt: skip


def test_an_allowed_destination_is_reached_through_the_proxy(egress: tuple[Applied, dict[str, Any], int]) -> None:
    _, out, _ = egress
    assert out["allowed"] == [200, "hello-from-upstream /ok"], out
    assert shutil.which("curl"), "curl is missing (Makefile DEB_PACKAGES installs it)"
    assert out["curl"] == "hello-from-upstream /curl 200", out
    assert "/ok" in _Upstream.seen


def test_refusals_are_403_egress_denied_and_never_reach_anything(egress: tuple[Applied, dict[str, Any], int]) -> None:
    _, out, _ = egress
    for key in ("denied", "port_not_allowed", "keepalive_second_denied"):
        status, body = out[key]
        assert status == 403 and "EGRESS_DENIED" in body, (key, out[key])
    assert not any(p.startswith("/x") for p in _Upstream.seen)


def test_no_direct_path_out_and_the_port_cannot_be_taken(egress: tuple[Applied, dict[str, Any], int]) -> None:
    _, out, _ = egress
    # The sandbox's loopback holds only the proxy listener; the host's own address is unreachable.
    assert out["direct_loopback"] == 111, out  # ECONNREFUSED: not the host's server on that port
    assert out["direct_host"] == 101, out  # ENETUNREACH
    assert out["udp"] == 101, out
    assert out["rebind"] == 98, out  # EADDRINUSE: the proxy's listener holds it


def test_each_connection_is_a_dpr_with_bytes_and_refusals_name_their_host(
    egress: tuple[Applied, dict[str, Any], int],
) -> None:
    a, _, port = egress
    _wait(lambda: any(r["effect"] == "PERMIT" and r.get("bytes_down") for r in _egress_records(a)), timeout=20)
    records = _egress_records(a)
    permits = [r for r in records if r["effect"] == "PERMIT"]
    denies = [r for r in records if r["effect"] == "DENY"]
    assert any(r["port"] == port and r["bytes_down"] > 0 and r["tier"] == "proxy" for r in permits), permits
    hosts = {r["host"] for r in denies}
    assert {"denied.example.test", "other.example.test"} <= hosts, denies
    assert all(r["code"] == "EGRESS_DENIED" and r["agent_id"] == "bot" for r in denies)
    status = json.loads(a.faramesh("status", "--format", "json").stdout)
    proxy = status["egress_proxy"]
    assert proxy is not None and proxy["running"] and proxy["listeners"] == 1, status


LAUNCHER_PROBE = r"""
import json, sys, urllib.error, urllib.request
def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode(errors="replace")]
    except OSError as e:
        return ["error", repr(e)]
print("RESULT " + json.dumps([fetch(sys.argv[1]), fetch("http://denied.example.test/")]))
"""


def test_the_launcher_gets_the_same_egress(egress: tuple[Applied, dict[str, Any], int]) -> None:
    """`.faramesh/bin/agent` (the line users run) hands its sandbox's listener to the same proxy."""
    a, _, port = egress
    proc = subprocess.run(
        [str(a.stack / ".faramesh" / "bin" / "agent"), "--agent", "bot", "--", "/usr/bin/python3", "-c",
         LAUNCHER_PROBE, f"http://127.0.0.1:{port}/launcher"],
        env=a.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd="/",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "S3 egress: 127.0.0.1:3128 is the engine's proxy" in proc.stderr, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    allowed, denied = json.loads(line[len("RESULT "):])
    assert allowed == [200, "hello-from-upstream /launcher"], allowed
    assert denied[0] == 403 and "EGRESS_DENIED" in denied[1], denied
    # The launch ended: its listener is gone again (only the supervised agent's remains).
    _wait(lambda: json.loads(a.faramesh("status", "--format", "json").stdout)["egress_proxy"]["listeners"] == 1)


def test_status_shows_the_proxy(egress: tuple[Applied, dict[str, Any], int]) -> None:
    a, _, _ = egress
    proc = a.faramesh("status")
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("egress ")), "")
    assert "proxy running" in line and "listener(s)" in line and "refused" in line, proc.stdout
    refused = int(line.split(" refused")[0].rsplit(" ", 1)[1])
    assert refused >= 3, line  # denied.example.test, the disallowed port, other.example.test


def test_tls_through_connect_and_nothing_else(egress: tuple[Applied, dict[str, Any], int]) -> None:
    """HTTPS goes through a CONNECT tunnel end to end (the proxy never sees inside); CONNECT to a port the
    entry does not name is refused; no resolver is reachable from inside."""
    _, out, _ = egress
    assert out["https"] == [200, "hello-from-upstream /tls"], out
    assert shutil.which("curl"), "curl is missing (Makefile DEB_PACKAGES installs it)"
    assert out["curl_tls"] == "hello-from-upstream /curl-tls", out
    assert "403" in out["connect_22"], out
    assert out["dns"] == "gaierror", out
