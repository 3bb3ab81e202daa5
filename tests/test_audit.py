"""`faramesh audit verify|tail|show|export|verify-bundle|backup`, `faramesh explain` and `plan --since`.

The WAL under test is a real one: the production engine (`runner.serve_server`: the installed compiled
policy, the SQLite store, the persisted signing key in the state dir) runs in-process three times over
one stack, with agents' govern requests, an approval, a settlement, and a simulated crash that leaves an
unsigned tail for the next start's recovery checkpoint. Each test works on its own copy of the state
dir; tamper tests edit that copy with sqlite3 the way an attacker with file access could, and each
must be caught with the right offender. One test runs the real `faramesh serve` as a subprocess and
audits its WAL while it is writing.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from faramesh.engine.paths import StackPaths, stack_paths
from faramesh.engine.wal.dpr import canonical_bytes, chain_hash
from faramesh.engine.wal.signer import checkpoint_message, fingerprint
from faramesh.engine.wal.verify import is_canonical
from faramesh.launchers.cli import main
from hypothesis import given
from hypothesis import strategies as st

CONSOLE_SCRIPT = Path(sys.executable).with_name("faramesh")

POLICY = """\
runtime {
  backend = "sqlite"
  wal_sync = "normal"
  cold_start_deny_window = "10s"
}

agent "bot" {
  default deny
  rules {
    permit search
    permit shell/ls
    permit refund if amount < 25
    defer refund if amount < 500
    deny refund reason "too large"
    deny! shell/*
  }
  rate_limit "search": 100 per minute
  budget daily { max $1000 on_exceed defer }
  redact refund args: ["card.number"]
}

agent "helper" {
  default permit
  rules {
    deny secrets/*
  }
}
"""


# ------------------------------------------------------------------------------------ engine in-process


class Client:
    """One blocking connection speaking the line protocol."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        self.file.write(json.dumps(message).encode() + b"\n")
        self.file.flush()
        reply: dict[str, Any] = json.loads(self.file.readline())
        return reply

    def govern(self, tool: str, args: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        return self.call({"type": "govern", "v": 1, "tool_id": tool, "args": args or {}, **extra})

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@contextlib.contextmanager
def engine(stack: Path, paths: StackPaths, *, crash: bool = False, quiet_checkpoints: bool = False) -> Iterator[Any]:
    """The production serve assembly on its own loop in a thread. `quiet_checkpoints`: no periodic
    checkpoint after the first batch; `crash`: stop without the shutdown checkpoint (as a kill would)."""
    import asyncio

    from faramesh.engine.runner import serve_server

    server = serve_server(stack, paths)
    if quiet_checkpoints:
        server.wal.checkpoint_interval = 3600.0
    if crash:
        server.wal.write_checkpoint_sync = lambda kind: None  # type: ignore[method-assign]
    loop = asyncio.new_event_loop()
    box: dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            box["rc"] = loop.run_until_complete(server.run())
        except BaseException as exc:  # surfaced below
            box["error"] = exc
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while server.lifecycle != "READY":
        assert thread.is_alive(), box
        assert time.monotonic() < deadline, server.lifecycle
        time.sleep(0.005)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(server._stop.set)
        thread.join(30)
        assert not thread.is_alive()
        assert "error" not in box, box["error"]
        assert box.get("rc") == 0, box


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *args: str | Path, rc: int = 0) -> Any:
    code, out, err = cli(capsys, *args, "--format", "json")
    assert code == rc, (code, out, err)
    return json.loads(out)


class World:
    """What the module fixture built: the stack, the pristine state root and the ids of interesting DPRs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stack = root / "stack"
        self.state_root = root / "state"
        self.runtime_root = root / "run"
        self.ids: dict[str, str] = {}
        self.approval_id = ""
        self.head_seq = 0
        self.crash_from = 0  # first seq of the tail the recovery checkpoint signed


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("audit"))
    w.stack.mkdir()
    (w.stack / "governance.fms").write_text(POLICY, encoding="utf-8")
    mp = pytest.MonkeyPatch()
    mp.setenv("FARAMESH_STATE_DIR", str(w.state_root))
    mp.setenv("FARAMESH_RUNTIME_DIR", str(w.runtime_root))
    mp.setenv("FARAMESH_LOG_DIR", str(w.root / "crash-logs"))
    try:
        paths = stack_paths(w.stack)
        paths.state_dir.mkdir(parents=True, mode=0o700)
        assert main(["compile", "--dir", str(w.stack), "--out", str(paths.policy_copy)]) == 0  # as `apply` installs

        # Run 1: every kind of decision, an approval, a settlement; a clean stop (shutdown checkpoint).
        with engine(w.stack, paths):
            bot = Client(paths.agent_socket("bot"))
            for n in range(3):
                r = bot.govern("search", {"q": f"q{n}"}, session_id="s1", call_id=f"c{n}")
                assert r["effect"] == "PERMIT", r
            w.ids["search3"] = r["action_id"]
            r = bot.govern("refund", {"amount": 10, "card": {"number": "4111111111111111"}})
            assert r["effect"] == "PERMIT", r
            w.ids["refund_small"] = r["action_id"]
            r = bot.govern("refund", {"amount": 100, "order": "o-1"})
            assert r["effect"] == "DEFER", r
            w.ids["refund_defer"] = r["action_id"]
            w.approval_id = r["defer_token"]
            r = bot.govern("refund", {"amount": 1000})
            assert r["effect"] == "DENY", r
            w.ids["refund_deny"] = r["action_id"]
            r = bot.govern("shell/ls")
            assert r["effect"] == "DENY" and r["structured_denial"]["rule_ref"] == "governance.fms:15", r
            w.ids["shell_ls"] = r["action_id"]
            r = bot.govern("unknown/tool")
            assert r["effect"] == "DENY", r
            w.ids["default_deny"] = r["action_id"]
            op = Client(paths.operator_socket)
            r = op.call({"type": "approve", "approval_id": w.approval_id, "approver": "alice"})
            assert r["approval"]["status"] == "APPROVED", r
            r = bot.govern("refund", {"amount": 100, "order": "o-1"})
            assert r["effect"] == "PERMIT", r
            w.ids["refund_approved"] = r["action_id"]
            r = bot.call({"type": "complete", "action_id": w.ids["refund_small"], "usage": {"cost_cents": 7}})
            assert r.get("settled_cents") == 7, r
            helper = Client(paths.agent_socket("helper"))
            r = helper.govern("secrets/read")
            assert r["effect"] == "DENY", r
            for c in (bot, op, helper):
                c.close()
        with sqlite3.connect(paths.wal_path(None)) as db:
            w.crash_from = db.execute("SELECT max(seq) FROM records").fetchone()[0] + 1

        # Run 2: a first signed batch, then an unsigned tail, then a "crash" (no shutdown checkpoint).
        with engine(w.stack, paths, crash=True, quiet_checkpoints=True):
            bot = Client(paths.agent_socket("bot"))
            for n in range(4):
                assert bot.govern("search", {"q": f"late{n}"})["effect"] == "PERMIT"
            bot.close()
        # Run 3: start-up signs the tail with a recovery checkpoint; nothing else happens.
        with engine(w.stack, paths):
            pass
        with sqlite3.connect(paths.wal_path(None)) as db:
            w.head_seq = db.execute("SELECT max(seq) FROM records").fetchone()[0]
            kinds = [k for (k,) in db.execute("SELECT kind FROM checkpoints ORDER BY seq")]
        assert kinds[-1] == "recovery", kinds
        yield w
    finally:
        mp.undo()


@pytest.fixture()
def env(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """A private copy of the built state dir, pointed at by FARAMESH_STATE_DIR."""
    state = tmp_path / "state"
    shutil.copytree(world.state_root, state)
    monkeypatch.setenv("FARAMESH_STATE_DIR", str(state))
    monkeypatch.setenv("FARAMESH_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("FARAMESH_LOG_DIR", str(tmp_path / "crash-logs"))
    return Env(world, stack_paths(world.stack), tmp_path)


class Env:
    def __init__(self, world: World, paths: StackPaths, tmp: Path) -> None:
        self.world = world
        self.stack = world.stack
        self.paths = paths
        self.tmp = tmp
        self.wal = paths.wal_path(None)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.wal, isolation_level=None)

    def body(self, seq: int) -> bytes:
        with contextlib.closing(self.db()) as db:
            return bytes(db.execute("SELECT body FROM records WHERE seq = ?", (seq,)).fetchone()[0])

    def seq_of(self, record_id: str) -> int:
        with contextlib.closing(self.db()) as db:
            return int(db.execute("SELECT seq FROM records WHERE id = ?", (record_id,)).fetchone()[0])

    def id_at(self, seq: int) -> str:
        with contextlib.closing(self.db()) as db:
            return str(db.execute("SELECT id FROM records WHERE seq = ?", (seq,)).fetchone()[0])

    def chain_id(self) -> str:
        with contextlib.closing(self.db()) as db:
            return str(db.execute("SELECT value FROM meta WHERE key = 'chain_id'").fetchone()[0])


def verify(capsys: pytest.CaptureFixture[str], e: Env, *extra: str | Path, rc: int = 0) -> dict[str, Any]:
    data: dict[str, Any] = cli_json(capsys, "audit", "verify", "--dir", e.stack, *extra, rc=rc)
    return data


def offender(capsys: pytest.CaptureFixture[str], e: Env, *extra: str | Path) -> dict[str, Any]:
    data = verify(capsys, e, *extra, rc=1)
    assert data["ok"] is False
    result: dict[str, Any] = data["offender"]
    return result


def rechain(db: sqlite3.Connection, chain_id: str, from_seq: int, first_body: bytes | None = None) -> None:
    """What an attacker with write access does after editing record `from_seq`: recompute every link
    and hash from there on, so only canonical-bytes checks and signatures can still tell."""
    prev = db.execute("SELECT record_hash FROM records WHERE seq = ?", (from_seq - 1,)).fetchone()
    prev_hash = prev[0] if prev else hashlib.sha256(b"faramesh.dpr.genesis/v1\x00" + chain_id.encode()).hexdigest()
    rows = db.execute("SELECT seq, body FROM records WHERE seq >= ? ORDER BY seq", (from_seq,)).fetchall()
    for seq, body in rows:
        if seq == from_seq and first_body is not None:
            new_body = first_body
        else:
            data = orjson.loads(body)
            data["prev_record_hash"] = prev_hash
            new_body = canonical_bytes(data)
        prev_hash = chain_hash(prev_hash, new_body)
        db.execute("UPDATE records SET body = ?, record_hash = ? WHERE seq = ?", (new_body, prev_hash, seq))


# ------------------------------------------------------------------------------------------- verify


def test_verify_passes_and_reports_the_recovery_signed_tail(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    data = verify(capsys, env)
    w = env.world
    assert data["ok"] is True and data["offender"] is None
    assert data["records"] == data["total_records"] == w.head_seq
    assert data["first_seq"] == 1 and data["last_seq"] == w.head_seq
    assert data["signed_through"] == w.head_seq and data["unsigned_tail"] == 0
    assert data["keys_pinned"] is True and len(data["keys_used"]) == 1
    assert data["pinned_keys"][0]["fingerprint"] == data["keys_used"][0]
    (late,) = data["recovery_signed"]
    assert late[1] == w.head_seq and w.crash_from < late[0] <= w.head_seq  # run 2's first batch was signed
    rc, out, err = cli(capsys, "audit", "verify", "--dir", env.stack, "--require-signed")
    assert rc == 0, out + err
    assert out.splitlines()[-1] == "intact"
    assert f"signed late: records {late[0]}–{late[1]}, by a recovery checkpoint" in out
    assert "keys (pinned)" in out and "signing.key" in out


def test_verify_of_a_stopped_engine_creates_no_files(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    before = sorted(p.name for p in env.paths.state_dir.iterdir())
    verify(capsys, env)
    assert sorted(p.name for p in env.paths.state_dir.iterdir()) == before


def test_unsigned_tail_passes_unless_signatures_are_required(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    with contextlib.closing(env.db()) as db:
        db.execute("DELETE FROM checkpoints WHERE kind = 'recovery'")
    data = verify(capsys, env)
    lo, hi = data["unsigned_range"]
    assert hi == env.world.head_seq and data["unsigned_tail"] == hi - lo + 1 > 0
    rc, out, _ = cli(capsys, "audit", "verify", "--dir", env.stack)
    assert rc == 0 and f"unsigned: records {lo}–{hi} are not yet covered" in out
    off = offender(capsys, env, "--require-signed")
    assert off["seq"] == lo and "not covered by a signed checkpoint" in off["problem"]


def test_progress_line_on_request(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    rc, _, err = cli(capsys, "audit", "verify", "--dir", env.stack, "--progress")
    n = env.world.head_seq
    assert rc == 0 and f"verified {n} of {n} records (100%)" in err and "records/s" in err
    rc, _, err = cli(capsys, "audit", "verify", "--dir", env.stack)
    assert rc == 0 and "records/s" not in err  # stderr is not a terminal and --progress was not given


def test_verify_range_checks_only_that_range(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    data = verify(capsys, env, "--from", "3", "--to", "6")
    assert data["ok"] and data["records"] == 4 and data["range"] == [3, 6] and data["anchor_hash"]
    with contextlib.closing(env.db()) as db:
        db.execute("UPDATE records SET effect = 'TAMPERED' WHERE seq = 9")
    assert verify(capsys, env, "--from", "3", "--to", "6")["ok"] is True  # outside the range
    assert offender(capsys, env, "--from", "8")["seq"] == 9
    assert offender(capsys, env)["seq"] == 9
    rc, _, err = cli(capsys, "audit", "verify", "--dir", env.stack, "--from", "5", "--to", "4")
    assert rc == 64 and "before --from" in err


# ------------------------------------------------------------------------------------------ tampering


def test_flipped_byte_in_a_body(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    seq = env.seq_of(env.world.ids["refund_deny"])
    body = env.body(seq)
    assert b'"DENY"' in body
    with contextlib.closing(env.db()) as db:
        db.execute("UPDATE records SET body = ? WHERE seq = ?", (body.replace(b'"DENY"', b'"DENX"', 1), seq))
    off = offender(capsys, env)
    assert off == {"seq": seq, "id": env.world.ids["refund_deny"], "kind": "record",
                   "problem": "record_hash does not match the stored bytes"}  # fmt: skip
    rc, out, _ = cli(capsys, "audit", "verify", "--dir", env.stack)
    assert rc == 1 and f"BROKEN at seq {seq} (record {env.world.ids['refund_deny']})" in out


def test_flipped_byte_that_breaks_the_json(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    with contextlib.closing(env.db()) as db:
        body = env.body(5)
        db.execute("UPDATE records SET body = ? WHERE seq = 5", (b"[" + body[1:],))
    off = offender(capsys, env)
    assert off["seq"] == 5 and off["problem"] == "stored bytes are not JSON"


def test_changed_indexed_column(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    seq = env.seq_of(env.world.ids["refund_deny"])
    with contextlib.closing(env.db()) as db:
        db.execute("UPDATE records SET effect = 'PERMIT' WHERE seq = ?", (seq,))
    off = offender(capsys, env)
    assert off["seq"] == seq and off["problem"] == "indexed column `effect` differs from the record body"


def test_deleted_middle_record_is_a_gap(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    with contextlib.closing(env.db()) as db:
        db.execute("DELETE FROM records WHERE seq = 6")
    off = offender(capsys, env)
    assert off["seq"] == 7 and off["id"] == env.id_at(7)
    assert off["problem"] == "sequence gap: expected seq 6, found 7"


def test_swapped_bodies(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    a, b = env.body(4), env.body(5)
    with contextlib.closing(env.db()) as db:
        db.execute("UPDATE records SET body = ? WHERE seq = 4", (b,))
        db.execute("UPDATE records SET body = ? WHERE seq = 5", (a,))
    off = offender(capsys, env)
    assert off["seq"] == 4 and off["problem"] == "prev_record_hash does not link to the previous record"


def test_non_canonical_bytes_even_with_every_hash_recomputed(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    seq = env.seq_of(env.world.ids["refund_small"])
    body = env.body(seq)
    spaced = body.replace(b'","', b'", "', 1)
    assert spaced != body and orjson.loads(spaced) == orjson.loads(body)
    with contextlib.closing(env.db()) as db:
        rechain(db, env.chain_id(), seq, spaced)
    off = offender(capsys, env)
    assert off["seq"] == seq and off["problem"] == "stored bytes are not canonical (RFC 8785)"


def test_rewritten_record_with_rechained_hashes_is_caught_by_the_checkpoint(
    capsys: pytest.CaptureFixture[str], env: Env
) -> None:
    """Canonical bytes and consistent links, but the signed head no longer matches."""
    seq = env.seq_of(env.world.ids["refund_deny"])
    data = orjson.loads(env.body(seq))
    data["effect"] = data["policy_effect"] = "PERMIT"
    with contextlib.closing(env.db()) as db:
        db.execute("UPDATE records SET effect = 'PERMIT' WHERE seq = ?", (seq,))
        rechain(db, env.chain_id(), seq, canonical_bytes(data))
        first_cp = db.execute("SELECT min(seq) FROM checkpoints WHERE seq >= ?", (seq,)).fetchone()[0]
    off = offender(capsys, env)
    assert off["kind"] == "checkpoint" and off["seq"] == first_cp
    assert off["problem"] == f"checkpoint at seq {first_cp} does not match the chain head there"


def test_forged_checkpoint_signature(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    with contextlib.closing(env.db()) as db:
        cp_seq = db.execute("SELECT seq FROM checkpoints ORDER BY seq LIMIT 1 OFFSET 1").fetchone()[0]
        db.execute(
            "UPDATE checkpoints SET signature = ? WHERE seq = ?", (base64.b64encode(os.urandom(64)).decode(), cp_seq)
        )
    off = offender(capsys, env)
    assert off == {"seq": cp_seq, "id": env.id_at(cp_seq), "kind": "checkpoint",
                   "problem": f"checkpoint at seq {cp_seq}: signature does not verify"}  # fmt: skip


def _attacker_resigns_everything(env: Env) -> str:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pub, fp = base64.b64encode(raw).decode(), fingerprint(raw)
    chain = env.chain_id()
    with contextlib.closing(env.db()) as db:
        seq = env.seq_of(env.world.ids["refund_deny"])
        data = orjson.loads(env.body(seq))
        data["effect"] = data["policy_effect"] = "PERMIT"
        db.execute("UPDATE records SET effect = 'PERMIT' WHERE seq = ?", (seq,))
        rechain(db, chain, seq, canonical_bytes(data))
        for (cp_seq,) in db.execute("SELECT seq FROM checkpoints").fetchall():
            head = db.execute("SELECT record_hash FROM records WHERE seq = ?", (cp_seq,)).fetchone()[0]
            sig = base64.b64encode(key.sign(checkpoint_message(chain, cp_seq, head))).decode()
            db.execute(
                "UPDATE checkpoints SET head_hash = ?, public_key = ?, key_fingerprint = ?, signature = ? "
                "WHERE seq = ?",
                (head, pub, fp, sig, cp_seq),
            )
    return fp


def test_checkpoints_re_signed_with_an_attacker_key_fail_against_the_pinned_key(
    capsys: pytest.CaptureFixture[str], env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    fp = _attacker_resigns_everything(env)
    off = offender(capsys, env)
    assert off["kind"] == "checkpoint" and f"signed by key {fp}, which is not pinned" in off["problem"]
    # Without a pinned key (the WAL alone, away from its stack) the forgery is self-consistent: that is
    # why verify pins the stack's own key and warns loudly when it cannot.
    monkeypatch.chdir(env.tmp)
    rc, out, err = cli(capsys, "audit", "verify", "--wal", env.wal)
    assert rc == 0 and "keys (NOT pinned)" in out and "no pinned key" in err
    # Pinning the real key explicitly catches it again.
    real = verify(capsys, env, rc=1)  # fails, but lists the pinned key it used
    key_file = env.tmp / "engine.pub"
    key_file.write_text(f"# the engine's key\ned25519:{real['pinned_keys'][0]['public_key']}\n", encoding="utf-8")
    data = cli_json(capsys, "audit", "verify", "--wal", env.wal, "--key", key_file, rc=1)
    assert "which is not pinned" in data["offender"]["problem"]


def test_records_cut_from_the_end(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    n = env.world.head_seq
    with contextlib.closing(env.db()) as db:
        db.execute("DELETE FROM records WHERE seq > ?", (n - 2,))
    off = offender(capsys, env)
    assert off["kind"] == "checkpoint" and off["seq"] == n
    assert "beyond the last record" in off["problem"] and "removed from the end" in off["problem"]


def test_damaged_column_types_are_offenders_not_crashes(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    with contextlib.closing(env.db()) as db:
        db.execute("UPDATE records SET id = CAST(id AS BLOB) || x'ff' WHERE seq = 4")
        db.execute("UPDATE records SET record_hash = 'zz' WHERE seq = 6")
        db.execute("UPDATE checkpoints SET signature = x'00ff' WHERE seq = (SELECT max(seq) FROM checkpoints)")
    off = offender(capsys, env)
    assert off["seq"] == 4 and off["problem"] == "indexed column `id` differs from the record body"
    off = offender(capsys, env, "--from", "7")
    assert off["seq"] == 7 and off["problem"] == "prev_record_hash does not link to the previous record"
    rc, out, err = cli(capsys, "audit", "export", "--dir", env.stack, "--as", "jsonl")
    assert rc == 0 and "Traceback" not in err and len(out.splitlines()) > env.world.head_seq
    rc, out, err = cli(capsys, "audit", "tail", "--dir", env.stack)
    assert rc == 0 and "\ufffd" in out


@pytest.mark.parametrize("garbage", ["random", "zeros"])
def test_a_damaged_sqlite_page_is_a_failed_check(capsys: pytest.CaptureFixture[str], env: Env, garbage: str) -> None:
    """A page holding records overwritten below SQLite's level: every command fails cleanly, never a crash."""
    data = bytearray(env.wal.read_bytes())
    page = 4096
    at = data.find(b'"id":"' + env.world.ids["shell_ls"].encode()) // page * page
    assert at > 0
    data[at + 8 : at + page] = os.urandom(page - 8) if garbage == "random" else bytes(page - 8)
    env.wal.write_bytes(bytes(data))
    for args in (["audit", "verify"], ["audit", "tail"], ["audit", "export"], ["explain", env.world.ids["search3"]]):
        rc, out, err = cli(capsys, *args, "--dir", env.stack)
        assert rc in (0, 1), (args, rc, err)
        assert "internal error" not in err and "Traceback" not in err
    rc, out, err = cli(capsys, "audit", "verify", "--dir", env.stack)
    assert rc == 1, out + err
    assert "BROKEN" in out or "cannot be read" in err, out + err


def test_a_file_that_is_not_a_wal(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    bogus = env.tmp / "bogus.sqlite"
    bogus.write_bytes(b"not a database at all" * 100)
    rc, _, err = cli(capsys, "audit", "verify", "--wal", bogus)
    assert rc == 1 and "is not a readable Faramesh WAL" in err and "Traceback" not in err
    rc, _, err = cli(capsys, "audit", "verify", "--wal", env.tmp / "absent.sqlite")
    assert rc == 1 and "no WAL file" in err


# ------------------------------------------------------------------------------------- where the WAL is


def test_dev_stack_says_its_wal_is_in_memory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from faramesh.engine.policy.stack import compile_stack
    from faramesh.engine.runner import dev_server

    stack = tmp_path / "devstack"
    stack.mkdir()
    (stack / "governance.fms").write_text(POLICY, encoding="utf-8")
    monkeypatch.setenv("FARAMESH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FARAMESH_RUNTIME_DIR", str(tmp_path / "run"))
    rc, _, err = cli(capsys, "audit", "verify", "--dir", stack)
    assert rc == 1 and "has not been run by `faramesh serve`" in err
    import asyncio

    paths = stack_paths(stack)
    server = dev_server(compile_stack(stack).policy, stack, paths)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: loop.run_until_complete(server.run()), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while server.lifecycle != "READY":
            assert time.monotonic() < deadline
            time.sleep(0.005)
        for args in (["audit", "verify"], ["audit", "tail"], ["explain", "01ANYTHING"]):
            rc, out, err = cli(capsys, *args, "--dir", stack)
            assert rc == 1, (args, out, err)
            assert "runs as `faramesh dev`, whose WAL is in memory" in err
    finally:
        loop.call_soon_threadsafe(server._stop.set)
        thread.join(30)


def test_memory_backend_is_refused_plainly(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    data = json.loads(env.paths.policy_copy.read_bytes())
    data["runtime"]["backend"] = "memory"
    env.paths.policy_copy.write_bytes(json.dumps(data).encode())
    rc, _, err = cli(capsys, "audit", "verify", "--dir", env.stack)
    assert rc == 1 and 'backend = "memory"' in err


def test_audit_while_the_real_engine_serves(tmp_path: Path) -> None:
    """`faramesh serve` in a subprocess writes while `audit verify`, `tail` and `backup` read."""
    stack = tmp_path / "live"
    stack.mkdir()
    (stack / "governance.fms").write_text(POLICY, encoding="utf-8")
    env = {**os.environ, "FARAMESH_STATE_DIR": str(tmp_path / "st"), "FARAMESH_RUNTIME_DIR": str(tmp_path / "rt"),
           "FARAMESH_LOG_DIR": str(tmp_path / "logs")}  # fmt: skip
    env.pop("FARAMESH_SOCKET", None)
    policy = tmp_path / "policy.json"

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        argv = [str(CONSOLE_SCRIPT), *map(str, args)]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)

    assert run("compile", "--dir", stack, "--out", policy).returncode == 0
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([str(CONSOLE_SCRIPT), "serve", "--dir", str(stack), "--policy", str(policy)],
                            env=env, stdout=log, stderr=log, cwd=stack)  # fmt: skip
    log.close()
    try:
        paths = stack_paths(stack, env=env)
        deadline = time.monotonic() + 20
        while not paths.agent_socket("bot").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.02)
        time.sleep(0.2)
        bot = Client(paths.agent_socket("bot"))
        stop = threading.Event()
        sent = [0]

        def traffic() -> None:
            while not stop.is_set():
                assert bot.govern("search", {"q": str(sent[0])})["action_id"]
                sent[0] += 1

        writer = threading.Thread(target=traffic, daemon=True)
        writer.start()
        try:
            for _ in range(3):
                v = run("audit", "verify", "--dir", stack, "--format", "json")
                assert v.returncode == 0, v.stdout + v.stderr
                assert json.loads(v.stdout)["keys_pinned"] is True
            t = run("audit", "tail", "--dir", stack, "-n", "3")
            assert t.returncode == 0 and len(t.stdout.splitlines()) == 3, t.stdout
            b = run("audit", "backup", tmp_path / "live-copy.sqlite", "--dir", stack)
            assert b.returncode == 0 and "the copy verifies" in b.stdout, b.stdout + b.stderr
        finally:
            stop.set()
            writer.join(10)
            bot.close()
        assert sent[0] > 0
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
    v = run("audit", "verify", "--dir", stack, "--require-signed", "--format", "json")
    assert v.returncode == 0, v.stdout + v.stderr
    assert json.loads(v.stdout)["records"] >= sent[0]


# ----------------------------------------------------------------------------------------- tail / show


def test_tail_filters(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    data = cli_json(capsys, "audit", "tail", "--dir", env.stack, "-n", "100")
    seqs = [r["seq"] for r in data["records"]]
    assert seqs == sorted(seqs) and seqs[-1] == env.world.head_seq and len(seqs) == env.world.head_seq
    denies = cli_json(capsys, "audit", "tail", "--dir", env.stack, "--effect", "DENY", "-n", "100")["records"]
    assert denies and {r["effect"] for r in denies} == {"DENY"}
    assert {r["agent_id"] for r in denies} == {"bot", "helper"}
    helper = cli_json(capsys, "audit", "tail", "--dir", env.stack, "--agent", "helper")["records"]
    assert [r["tool"] for r in helper] == ["secrets/read"]
    refunds = cli_json(capsys, "audit", "tail", "--dir", env.stack, "--tool", "REF*", "--lines", "100")["records"]
    assert refunds and {r["tool"] for r in refunds} == {"refund"}
    assert len(cli_json(capsys, "audit", "tail", "--dir", env.stack, "-n", "2")["records"]) == 2
    rc, out, _ = cli(capsys, "audit", "tail", "--dir", env.stack, "--effect", "defer", "--agent", "bot")
    assert rc == 0 and env.world.ids["refund_defer"] in out and "DEFER" in out and "governance.fms:13" in out
    rc, out, _ = cli(capsys, "audit", "tail", "--dir", env.stack, "--agent", "nobody")
    assert rc == 0 and out == "no matching records\n"
    rc, _, err = cli(capsys, "audit", "tail", "--dir", env.stack, "--effect", "maybe")
    assert rc == 64 and "maybe" in err


def test_show_one_record_with_its_chain_position(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    rid = env.world.ids["refund_small"]
    data = cli_json(capsys, "audit", "show", rid, "--dir", env.stack)
    assert data["dpr"]["id"] == rid and data["dpr"]["effect"] == "PERMIT" and data["dpr"]["record_hash"]
    assert data["request_args"] == {"amount": 10, "card": {"number": "[REDACTED]"}}
    chain = data["chain"]
    assert chain["seq"] == env.seq_of(rid) and chain["record_hash_matches_bytes"] is True
    assert chain["checkpoint"]["seq"] >= chain["seq"] and chain["checkpoint"]["key_pinned"] is True
    assert chain["proof"]["ok"] is True
    assert chain["proof"]["records_walked"] == chain["checkpoint"]["seq"] - chain["seq"] + 1
    rc, out, _ = cli(capsys, "audit", "show", rid, "--dir", env.stack)
    assert rc == 0 and f"DPR {rid} (tool_call)" in out and "(matches the stored bytes)" in out
    assert "signature verifies against a pinned key" in out
    assert "4111111111111111" not in out
    rc, _, err = cli(capsys, "audit", "show", "01NOSUCHRECORD", "--dir", env.stack)
    assert rc == 1 and "no record 01NOSUCHRECORD" in err


def test_show_detects_a_tampered_record_locally(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    rid = env.world.ids["refund_deny"]
    seq = env.seq_of(rid)
    with contextlib.closing(env.db()) as db:
        db.execute("UPDATE records SET body = ? WHERE seq = ?", (env.body(seq).replace(b'"DENY"', b'"DENX"', 1), seq))
    chain = cli_json(capsys, "audit", "show", rid, "--dir", env.stack)["chain"]
    assert chain["record_hash_matches_bytes"] is False and chain["proof"]["ok"] is False


# ------------------------------------------------------------------------------- export / verify-bundle


def _export(capsys: pytest.CaptureFixture[str], env: Env, as_: str, *extra: str) -> Path:
    out = env.tmp / f"bundle.{as_}"
    rc, stdout, err = cli(capsys, "audit", "export", "--dir", env.stack, "--as", as_, "--out", out, *extra)
    assert rc == 0 and stdout == "", err
    assert f"exported {env.world.head_seq} records" in err
    assert out.stat().st_mode & 0o777 == 0o600
    return out


def _engine_key_file(capsys: pytest.CaptureFixture[str], env: Env) -> Path:
    key = verify(capsys, env)["pinned_keys"][0]["public_key"]
    path = env.tmp / "engine.pub"
    path.write_text(f"ed25519:{key}\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("as_", ["jsonl", "json"])
def test_export_and_verify_bundle_round_trip(capsys: pytest.CaptureFixture[str], env: Env, as_: str) -> None:
    bundle = _export(capsys, env, as_, "--include-public-keys")
    data = cli_json(capsys, "audit", "verify-bundle", bundle, "--trust-bundle-keys")
    assert data["ok"] and data["records"] == env.world.head_seq and data["signed_through"] == env.world.head_seq
    assert data["recovery_signed"] and data["chain_id"] == env.chain_id()
    key_file = _engine_key_file(capsys, env)
    data = cli_json(capsys, "audit", "verify-bundle", bundle, "--key", key_file, "--require-signed")
    assert data["ok"] and data["keys_from"] == [str(key_file)]
    rc, out, _ = cli(capsys, "audit", "verify-bundle", bundle, "--key", key_file)
    assert rc == 0 and out.splitlines()[-1] == "intact"
    rc, _, err = cli(capsys, "audit", "verify-bundle", bundle)
    assert rc == 64 and "--trust-bundle-keys" in err


def test_bundle_without_keys_needs_a_pinned_key(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    bundle = _export(capsys, env, "jsonl")
    assert b"public_key" not in bundle.read_bytes()
    rc, _, err = cli(capsys, "audit", "verify-bundle", bundle, "--trust-bundle-keys")
    assert rc == 1 and "carries no public keys" in err
    assert cli_json(capsys, "audit", "verify-bundle", bundle, "--key", _engine_key_file(capsys, env))["ok"]


def test_tampered_bundles_fail(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    bundle = _export(capsys, env, "jsonl", "--include-public-keys")
    lines = bundle.read_bytes().splitlines(keepends=True)
    deny_seq = env.seq_of(env.world.ids["refund_deny"])
    idx = next(i for i, ln in enumerate(lines) if env.world.ids["refund_deny"].encode() in ln)

    edited = list(lines)
    edited[idx] = lines[idx].replace(b'"effect":"DENY"', b'"effect":"PERMIT"')
    assert edited[idx] != lines[idx]
    bundle.write_bytes(b"".join(edited))
    data = cli_json(capsys, "audit", "verify-bundle", bundle, "--trust-bundle-keys", rc=1)
    assert data["offender"]["seq"] == deny_seq and "record_hash" in data["offender"]["problem"]

    bundle.write_bytes(b"".join(lines[:idx] + lines[idx + 1 :]))  # a record removed
    data = cli_json(capsys, "audit", "verify-bundle", bundle, "--trust-bundle-keys", rc=1)
    assert data["offender"]["problem"] == f"sequence gap: expected seq {deny_seq}, found {deny_seq + 1}"

    bundle.write_bytes(b"".join(lines[:idx]) + b"{not json\n" + b"".join(lines[idx + 1 :]))
    rc, out, _ = cli(capsys, "audit", "verify-bundle", bundle, "--trust-bundle-keys")
    assert rc == 1 and "not JSON" in out

    # Truncated: the last records and checkpoints dropped, the header left claiming more.
    cut = [ln for ln in lines if b'"seq":' + str(env.world.head_seq).encode() not in ln]
    cut = [ln for ln in cut if b'"checkpoint"' not in ln or b'"kind":"recovery"' not in ln]
    bundle.write_bytes(b"".join(cut))
    data = cli_json(capsys, "audit", "verify-bundle", bundle, "--trust-bundle-keys", rc=1)
    assert "truncated or spliced" in data["offender"]["problem"]


def test_bundle_re_signed_by_an_attacker_fails_against_the_pinned_key(
    capsys: pytest.CaptureFixture[str], env: Env
) -> None:
    key_file = _engine_key_file(capsys, env)
    fp = _attacker_resigns_everything(env)
    bundle = _export(capsys, env, "json", "--include-public-keys")
    assert cli_json(capsys, "audit", "verify-bundle", bundle, "--trust-bundle-keys")["ok"]  # self-consistent
    data = cli_json(capsys, "audit", "verify-bundle", bundle, "--key", key_file, rc=1)
    assert data["offender"]["kind"] == "checkpoint" and f"{fp}, which is not pinned" in data["offender"]["problem"]


def test_csv_export_is_a_table_not_a_bundle(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    import csv

    table = _export(capsys, env, "csv")
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    assert len(rows) == env.world.head_seq
    deny = next(r for r in rows if r["id"] == env.world.ids["refund_deny"])
    assert deny["effect"] == "DENY" and deny["rule_ref"] == "governance.fms:14" and deny["record_hash"]
    rc, _, err = cli(capsys, "audit", "verify-bundle", table, "--trust-bundle-keys")
    assert rc == 1 and "csv export" in err
    rc, _, err = cli(capsys, "audit", "export", "--dir", env.stack, "--as", "csv", "--include-public-keys")
    assert rc == 64


def test_export_to_standard_output(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    rc, out, err = cli(capsys, "audit", "export", "--dir", env.stack)
    assert rc == 0 and "exported" in err
    lines = out.splitlines()
    header = json.loads(lines[0])
    assert header["format"] == "faramesh.audit-bundle/v1" and header["record_count"] == env.world.head_seq
    dprs = [json.loads(ln) for ln in lines[1:] if not ln.startswith('{"checkpoint"')]
    assert [d["seq"] for d in dprs] == list(range(1, env.world.head_seq + 1))
    assert all(d["record_hash"] for d in dprs)


# ------------------------------------------------------------------------------------------- backup


def test_backup_copy_verifies(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    copy = env.tmp / "backup.sqlite"
    data = cli_json(capsys, "audit", "backup", copy, "--dir", env.stack)
    assert data["records"] == env.world.head_seq and data["verification"]["ok"] is True
    assert data["verification"]["keys_pinned"] is True
    assert copy.stat().st_mode & 0o777 == 0o600
    assert not copy.with_name(copy.name + "-wal").exists()  # a self-contained file
    assert verify(capsys, env, "--wal", copy)["head_hash"] == verify(capsys, env)["head_hash"]
    rc, _, err = cli(capsys, "audit", "backup", copy, "--dir", env.stack)
    assert rc == 1 and "never overwrites" in err


def test_backup_of_a_broken_chain_says_so(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    with contextlib.closing(env.db()) as db:
        db.execute("DELETE FROM records WHERE seq = 3")
    rc, out, _ = cli(capsys, "audit", "backup", env.tmp / "b.sqlite", "--dir", env.stack)
    assert rc == 1 and "does NOT verify" in out and "sequence gap" in out


# ------------------------------------------------------------------------------------------- explain


def _explain(capsys: pytest.CaptureFixture[str], env: Env, key: str, *extra: str) -> dict[str, Any]:
    data: dict[str, Any] = cli_json(capsys, "explain", env.world.ids[key], "--dir", env.stack, *extra)
    return data


def test_explain_names_the_matching_rule_and_the_ones_that_did_not_match(
    capsys: pytest.CaptureFixture[str], env: Env
) -> None:
    data = _explain(capsys, env, "refund_defer")
    assert data["policy"]["matches_dpr"] is True and "installed copy" in data["policy"]["source"]
    rules = {r["index"]: r for r in data["explanation"]["rules"]}
    assert rules[1]["tool"] == "search" and rules[1]["glob_matched"] is False and rules[1]["outcome"] == "glob mismatch"
    assert rules[3]["condition"] == "amount < 25" and rules[3]["glob_matched"] is True
    assert rules[3]["condition_held"] is False and rules[3]["outcome"] == "condition false"
    assert rules[4]["effect"] == "defer" and rules[4]["outcome"] == "decided" and rules[4]["ref"] == "governance.fms:13"
    assert rules[5]["outcome"] == "not reached" and rules[6]["outcome"] == "glob mismatch"
    assert data["explanation"]["default_used"] is False
    assert data["explanation"]["decision"]["effect"] == "DEFER" and data["agrees_with_record"] is True
    assert data["request_args"] == {"amount": 100, "order": "o-1"}
    assert data["chain"]["proof"]["ok"] is True
    rc, out, err = cli(capsys, "explain", env.world.ids["refund_defer"], "--dir", env.stack)
    assert rc == 0 and err == ""
    assert "defer refund if amount < 500" in out and "condition held  ← decided" in out
    assert "permit refund if amount < 25" in out and "condition false" in out
    assert "agrees with the record" in out and "signed    by the" in out


def test_explain_strict_deny_overrides_an_earlier_permit(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    data = _explain(capsys, env, "shell_ls")
    outcomes = {r["tool"]: r["outcome"] for r in data["explanation"]["rules"]}
    assert outcomes["shell/ls"] == "overridden" and outcomes["shell/*"] == "decided"
    assert data["agrees_with_record"] is True


def test_explain_default_and_redacted_args(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    data = _explain(capsys, env, "default_deny")
    assert data["explanation"]["default_used"] is True and data["explanation"]["decision"]["effect"] == "DENY"
    assert all(r["outcome"] == "glob mismatch" for r in data["explanation"]["rules"])
    data = _explain(capsys, env, "refund_small")
    assert data["explanation"]["redacted_paths"] == ["card.number"]
    assert any("card.number" in n and "[REDACTED]" in n for n in data["notes"])


def test_explain_shows_rate_limit_and_budget_state(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    limits = {lim["kind"]: lim for lim in _explain(capsys, env, "search3")["explanation"]["limits"]}
    rate = limits["rate_limit"]
    assert rate["name"] == "search" and rate["capacity"] == 100 and rate["allowed"] is True
    assert 97.0 <= rate["tokens"] < 98.5  # two searches spent before this, refilled for milliseconds
    budget = limits["budget"]
    assert budget["name"] == "daily" and budget["max_cents"] == 100000 and budget["calls"] == 2
    rc, out, _ = cli(capsys, "explain", env.world.ids["search3"], "--dir", env.stack)
    assert rc == 0
    assert 'rate_limit "search": 100 per minute' in out and "tokens left → allowed" in out


def test_explain_an_approved_call(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    data = _explain(capsys, env, "refund_approved")
    assert data["recorded"]["code"] == "APPROVED" and data["recorded"]["approval_id"] == env.world.approval_id
    assert data["explanation"]["decision"]["effect"] == "DEFER" and data["agrees_with_record"] is True
    rc, out, _ = cli(capsys, "explain", env.world.ids["refund_approved"], "--dir", env.stack)
    assert rc == 0
    assert f"approval  {env.world.approval_id} approved by uid:" in out and "(alice)" in out


def test_explain_after_the_policy_changed_warns(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    data = json.loads(env.paths.policy_copy.read_bytes())
    data["agents"]["bot"]["rules"][3]["condition"] = ["cmp", "<", ["path", "args", "amount"], ["lit", 50]]
    env.paths.policy_copy.write_bytes(json.dumps(data).encode())
    rc, out, err = cli(capsys, "explain", env.world.ids["refund_defer"], "--dir", env.stack, "--format", "json")
    assert rc == 0 and "the policy changed since this decision" in err
    result = json.loads(out)
    assert result["policy"]["matches_dpr"] is False and result["agrees_with_record"] is False
    assert result["explanation"]["decision"]["effect"] == "DENY"


def test_explain_records_that_are_not_decisions(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    with contextlib.closing(env.db()) as db:
        (rid,) = db.execute("SELECT id FROM records WHERE action_type = 'settlement'").fetchone()
    data = cli_json(capsys, "explain", rid, "--dir", env.stack)
    assert data["explanation"] is None and "settlement" in data["reason"]
    assert env.world.ids["refund_small"] in data["reason"]
    rc, _, err = cli(capsys, "explain", "01NOSUCH", "--dir", env.stack)
    assert rc == 1 and "no record" in err


# ------------------------------------------------------------------------------------- plan --since


def test_plan_replay_prints_transitions_and_strict_replay_exits_2(capsys: pytest.CaptureFixture[str], env: Env) -> None:
    gov = env.stack / "governance.fms"
    original = gov.read_text(encoding="utf-8")
    try:
        rc, out, _ = cli(capsys, "plan", "--dir", env.stack, "--since", "24h")
        assert rc == 0 and "no decision changes" in out and "installed policy" in out
        assert cli(capsys, "plan", "--dir", env.stack, "--strict-replay")[0] == 0
        gov.write_text(original.replace("amount < 25", "amount < 5"), encoding="utf-8")
        rc, out, _ = cli(capsys, "plan", "--dir", env.stack, "--since", "24h")
        assert rc == 0
        assert f"permit→defer 1 call  (e.g. {env.world.ids['refund_small']})" in out
        assert 'evaluate as the string "[REDACTED]"' in out
        assert '+ agent "bot" rule permit refund if amount < 5 (governance.fms:12)' in out  # the diff is still there
        rc, out, err = cli(capsys, "plan", "--dir", env.stack, "--since", "24h", "--strict-replay")
        assert rc == 2 and "--strict-replay: 1 recorded decision(s) would change: exit 2" in err
        data = cli_json(capsys, "plan", "--dir", env.stack, "--strict-replay", rc=2)
        replay = data["replay"]
        assert replay["baseline"] == "policy" and replay["changed"] == 1
        assert replay["transitions"] == [
            {"from": "PERMIT", "to": "DEFER", "calls": 1, "examples": [env.world.ids["refund_small"]]}
        ]
        assert replay["requests"] == replay["unchanged"] + 1
        # A window that holds none of the records replays nothing.
        data = cli_json(capsys, "plan", "--dir", env.stack, "--since", "1s", "--strict-replay")
        assert data["replay"]["requests"] == 0
        rc, _, err = cli(capsys, "plan", "--dir", env.stack, "--since", "yesterday")
        assert rc == 64 and "--since" in err
    finally:
        gov.write_text(original, encoding="utf-8")


def test_plan_replay_against_recorded_decisions_when_nothing_is_installed(
    capsys: pytest.CaptureFixture[str], env: Env
) -> None:
    env.paths.policy_copy.unlink()
    gov = env.stack / "governance.fms"
    original = gov.read_text(encoding="utf-8")
    try:
        gov.write_text(original.replace("deny refund reason", "permit refund reason"), encoding="utf-8")
        replay = cli_json(capsys, "plan", "--dir", env.stack, "--since", "1d")["replay"]
        assert replay["baseline"] == "recorded"
        assert {(t["from"], t["to"]): t["calls"] for t in replay["transitions"]} == {("DENY", "PERMIT"): 1}
    finally:
        gov.write_text(original, encoding="utf-8")


def test_plan_replay_without_a_wal_still_prints_the_diff(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = tmp_path / "fresh"
    stack.mkdir()
    (stack / "governance.fms").write_text(POLICY, encoding="utf-8")
    monkeypatch.setenv("FARAMESH_STATE_DIR", str(tmp_path / "state"))
    rc, out, _ = cli(capsys, "plan", "--dir", stack, "--since", "24h", "--strict-replay")
    assert rc == 0
    assert '+ agent "bot"' in out and "replay: nothing to replay — no WAL for" in out
    data = cli_json(capsys, "plan", "--dir", stack, "--strict-replay")
    assert data["replay"]["wal"] is None and "no WAL" in data["replay"]["note"] and data["changes"]


# ---------------------------------------------------------------------- the verifier's canonical check


_SAFE = 2**53 - 1
_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-_SAFE, max_value=_SAFE)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


@given(st.dictionaries(st.text(max_size=6), _json, max_size=6))
def test_is_canonical_agrees_with_rfc8785(value: dict[str, Any]) -> None:
    """The verifier's fast check against the reference: for sorted-key orjson bytes (canonical on the DPR
    domain, not always beyond it) and for the JCS bytes themselves."""
    import rfc8785

    try:
        jcs = rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, ValueError, OverflowError):
        jcs = None
    if jcs is not None:
        assert is_canonical(orjson.loads(jcs), jcs)
    try:
        fast = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return
    assert is_canonical(orjson.loads(fast), fast) == (fast == jcs)


@pytest.mark.parametrize(
    ("body", "canonical"),
    [
        (b'{"a":9007199254740991}', True),  # the largest safe integer
        (b'{"a":9007199254740992}', True),  # 2^53: JCS's spelling of that double
        (b'{"a":9007199254740993}', False),  # no double is 2^53 + 1: JCS would print ...992
        (b'{"a":70652890535752850}', True),  # JCS prints the double 7.065289053575285e16 so
        (b'{"a":70652890535752848}', False),  # ... not as its exact integer value
        (b'{"a":1e+21}', True),
        (b'{"a":1e21}', False),
        (b'{"a":100000000000000000000}', True),
        (b'{"a":1.0}', False),
        (b'{"a":1}', True),
        (b'{"b":1,"a":2}', False),
        (b'{"a": 1}', False),
        (b'{"\xc3\xa9":1,"z":2}', False),  # JCS sorts by UTF-16 code units: "z" < "\u00e9"
        (b'{"z":2,"\xc3\xa9":1}', True),
    ],
)
def test_is_canonical_examples(body: bytes, canonical: bool) -> None:
    assert is_canonical(orjson.loads(body), body) is canonical
