"""Proxy-tier credentials end to end, as root through `apply` (issue 6 (b)): a rule delivers its Vault
secret `via` one plain-HTTP request; the sandboxed agent receives only a placeholder, the egress proxy
puts the secret into that request, and the secret reaches nothing the agent can read."""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from faramesh.engine.paths import stack_paths
from test_apply import Applied, new_applied
from test_provider_engine import SENTINEL, vault  # noqa: F401 - the module-scoped OpenBao fixture
from test_supervisor import _teardown, _wait

IS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not IS_ROOT, reason="apply launches agents under their own uids")

AGENT_PY = r"""
import json, os, socket, urllib.error, urllib.request
PORT = %(port)d
def govern(tool):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.environ["FARAMESH_SOCKET"])
    s.sendall(json.dumps({"type": "govern", "v": 1, "agent_id": "bot", "tool_id": tool, "args": {}}).encode() + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        data += s.recv(65536)
    return json.loads(data)

def post(path, placeholder):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=b"{}", method="POST",
                                 headers={"Authorization": f"Bearer {placeholder}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code

reply = govern("stripe/refund")
placeholder = reply.get("credential", {}).get("placeholder", "")
out = {"reply": reply, "first": post("/v1/refunds", placeholder), "replay": post("/v1/refunds", placeholder)}
second = govern("stripe/refund")["credential"]["placeholder"]
out["other_path"] = post("/v1/payouts", second)
with open("result.json.tmp", "w") as fh:
    json.dump(out, fh)
os.rename("result.json.tmp", "result.json")
import time
time.sleep(3600)
"""

POLICY = """\
runtime {
  backend = "sqlite"
  cold_start_deny_window = "20s"
}

provider "vault" {
  type = "vault"
  addr = "%(addr)s"
  token = env("VAULT_TOKEN")
  mount = "kv/data/payments"
  namespace = "platform"
  credential_ttl = "2m"
}

agent "bot" {
  command = "/usr/bin/python3 '%(agent)s'"
  default deny
  rules {
    permit stripe/refund credential "vault:stripe#api_key" via "POST http://127.0.0.1:%(port)d/v1/refunds"
  }
  egress { allow = ["127.0.0.1:%(port)d"] }
}
"""


class _Origin(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Origin.seen.append({"path": self.path, "authorization": self.headers.get("Authorization")})
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def delivered(vault: Any) -> Iterator[tuple[Applied, dict[str, Any]]]:  # noqa: F811 - the imported fixture
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    a = new_applied("faramesh-proxycred-")
    a.env["FARAMESH_CONFIG_DIR"] = str(a.base / "etc")
    a.env["VAULT_TOKEN"] = vault.root_token
    (a.stack / "agent.py").write_text(AGENT_PY % {"port": port})
    os.chmod(a.stack / "agent.py", 0o644)
    (a.stack / "governance.fms").write_text(POLICY % {"addr": vault.addr, "agent": a.stack / "agent.py", "port": port})
    try:
        proc = a.faramesh("apply")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        result = a.stack / "workspace" / "result.json"
        _wait(result.exists, timeout=60)
        yield a, json.loads(result.read_text())
    finally:
        _teardown(a)
        server.shutdown()


def test_the_agent_holds_a_placeholder_and_the_origin_gets_the_secret(
    delivered: tuple[Applied, dict[str, Any]],
) -> None:
    a, out = delivered
    credential = out["reply"]["credential"]
    assert out["reply"]["effect"] == "PERMIT", out
    assert credential["delivery"] == "proxy" and credential["advisory"] is False, credential
    assert "value" not in credential and credential["placeholder"].startswith("FARAMESH-CREDENTIAL-")
    assert out["first"] == 200 and _Origin.seen[0] == {"path": "/v1/refunds", "authorization": f"Bearer {SENTINEL}"}
    assert out["replay"] == 403 and out["other_path"] == 403, out  # one use, one request
    assert len(_Origin.seen) == 1
    # The secret is nowhere the agent (or anyone reading the stack) can read.
    for path in a.stack.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SENTINEL.encode() not in path.read_bytes(), path


def test_the_dpr_names_the_route_and_the_placeholder_never_the_value(
    delivered: tuple[Applied, dict[str, Any]],
) -> None:
    from faramesh.engine.wal.store import SqliteReader

    a, out = delivered
    wal = stack_paths(a.stack, env=a.env).wal_path(None)
    with SqliteReader(wal) as reader:
        raw = [bytes(r.body) for r in reader.records()]
    assert not any(SENTINEL.encode() in body for body in raw)
    refs = [json.loads(b)["credential_ref"] for b in raw if b'"credential_ref":{' in b]
    assert refs and refs[0]["delivery"] == "proxy" and refs[0]["route"].startswith("POST http://127.0.0.1:")
    assert refs[0]["placeholder"] == out["reply"]["credential"]["placeholder"]

    def spent() -> list[Any]:
        with SqliteReader(wal) as reader:
            bodies = [json.loads(r.body) for r in reader.records()]
        return [b["credentials"] for b in bodies if b.get("action_type") == "egress" and b.get("credentials")]

    _wait(lambda: bool(spent()), timeout=20)  # the connection's DPR names the grant it spent
    assert spent()[0] == [out["reply"]["credential"]["placeholder"]]


@pytest.mark.parametrize(
    ("via", "error"),
    [
        ('"POST https://api.example.com/v1/x"', "plain-HTTP"),
        ('"FETCH http://api.example.com/v1/x"', "METHOD"),
        ('"POST http://api.example.com/v1/x?k=1"', "no query"),
        ('"POST http://user:pw@api.example.com/v1/x"', "no query"),
        ('"POST http://api.example.com/v1/x Bad:Header"', "header name"),
    ],
)
def test_the_compiler_checks_the_route(via: str, error: str) -> None:
    from faramesh.engine.policy.errors import PolicySchemaError
    from test_provider_engine import compile_text

    with pytest.raises(PolicySchemaError, match=error):
        compile_text(f'permit stripe/refund credential "vault:stripe#api_key" via {via}')


def test_a_route_compiles_to_its_canonical_form() -> None:
    from test_provider_engine import compile_text

    policy = compile_text('permit stripe/refund credential "vault:stripe#api_key" via "post http://API.example.com/v1/r"')
    (route,) = policy.agents["a"].credential_routes.values()
    assert route == "POST http://api.example.com:80/v1/r Authorization"
