"""Checkpoints signed by a KMS (moto_server's AWS KMS, P-256) through the engine's `kms` provider child:
the real `faramesh serve`, then `faramesh audit verify` / `verify-bundle` offline.

What is checked: checkpoints of a KMS-signed chain verify offline against the key the engine pinned
(state dir and WAL meta, with its key id) and `audit verify` reports per-key counts; switching from the
local key to the KMS appends a `provider_change` DPR whose checkpoint the old key signs, and a checkpoint
the retired key signs after it is refused; KMS unreachable (moto stopped with SIGSTOP) → decisions go on,
the checkpoint queue grows in `status`, and drains once the KMS answers; `signing_required` → a permit
waits for its checkpoint and is denied (SIGNING_UNAVAILABLE) past `signing_timeout`, with a
`permit_withdrawn` DPR.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import Moto, moto_server
from engine_harness import PYTHON, EngineDirs, EngineProcess, compile_policy, govern, make_stack, short_tmpdir
from faramesh.engine.wal.signer import SignerPin, checkpoint_message, key_fingerprint, load_or_create_signer

WAIT = 30.0  # an upper bound that keeps a broken test from hanging; no assertion depends on it

AGENT = """
agent "bot" {
  default deny
  rules {
    permit search
    deny shell/*
  }
}
"""


def stack_text(kms: str = "", runtime: str = "") -> str:
    return f"""
runtime {{
  backend = "sqlite"
  wal_sync = "normal"
  cold_start_deny_window = "20s"
  {runtime}
}}
{kms}
{AGENT}"""


def kms_block(moto: Moto, arn: str, timeout: str = "2s") -> str:
    return f"""
provider "audit-kms" {{
  type = "kms"
  backend = "aws-kms"
  key_arn = "{arn}"
  endpoint_url = "{moto.endpoint}"
  timeout = "{timeout}"
}}
"""


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


class Stack:
    """One stack directory and its relocated state/runtime dirs, served by successive engines."""

    def __init__(self, env: dict[str, str]) -> None:
        self.root = short_tmpdir("fks")
        self.stack = make_stack(self.root, stack_text())
        self.policy_file = self.root / "policy.json"
        self.dirs = EngineDirs.fresh()
        self.env = env

    def engine(self, text: str) -> EngineProcess:
        compile_policy(self.stack, self.policy_file, text)
        return EngineProcess(self.stack, self.policy_file, self.dirs, hooks=self.env)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.dirs.env()}
        return subprocess.run([PYTHON, "-m", "faramesh.launchers.cli", *args], env=env, capture_output=True,
                              text=True, timeout=WAIT)  # fmt: skip

    def cleanup(self) -> None:
        self.dirs.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)


def wait_for(predicate: Any, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def checkpoints_status(engine: EngineProcess) -> dict[str, Any]:
    status = engine.status()
    assert status is not None
    wal = status["daemon"]["wal"]
    return {**wal["checkpoints"], "seq": wal["seq"], "signed_through": wal["signed_through"],
            "providers": status["providers"], "degraded": status["daemon"]["degraded"]}  # fmt: skip


def all_signed(engine: EngineProcess) -> dict[str, Any] | None:
    c = checkpoints_status(engine)
    return c if c["seq"] == c["signed_through"] and c["queue"] == 0 else None


def read_wal(path: Path) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]], dict[str, str]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        bodies = [json.loads(r[0]) for r in conn.execute("SELECT body FROM records ORDER BY seq")]
        checkpoints = conn.execute(
            "SELECT seq, kind, key_fingerprint, public_key FROM checkpoints ORDER BY seq"
        ).fetchall()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()
    return bodies, checkpoints, meta


def decide(engine: EngineProcess, n: int, tool: str = "search") -> list[dict[str, Any]]:
    with engine.agent("bot") as bot:
        return [bot.call(govern(tool, {"i": i})) for i in range(n)]


# --------------------------------------------------------------------------------------------- tests


def test_kms_checkpoints_verify_offline_and_the_switch_from_the_local_key_is_countersigned(moto: Moto) -> None:
    arn = moto.p256_key()
    s = Stack(moto.env())
    try:
        # 1. The local key signs (no kms provider).
        engine = s.engine(stack_text())
        with _started(engine):
            assert all(r["effect"] == "PERMIT" for r in decide(engine, 3))
            assert checkpoints_status(engine)["signer"].startswith("local:ed25519:")
        # 2. The same stack, now with a KMS: the hand-over, then KMS checkpoints.
        engine = s.engine(stack_text(kms_block(moto, arn)))
        with _started(engine):
            assert all(r["effect"] == "PERMIT" for r in decide(engine, 5))
            assert decide(engine, 1, "shell/rm")[0]["effect"] == "DENY"
            signed = wait_for(lambda: all_signed(engine))
            assert signed["signer"] == f"aws-kms:{arn}" and signed["provider"] == "audit-kms" and signed["remote"]
            assert {p["name"]: p["health"] for p in signed["providers"]} == {"audit-kms": "HEALTHY"}
        bodies, checkpoints, meta = read_wal(engine.wal_path)
        local = load_or_create_signer(engine.paths.signing_key)
        kms_der = moto.client("kms").get_public_key(KeyId=arn)["PublicKey"]
        kms_fp = key_fingerprint(base64.b64encode(kms_der).decode())
        assert kms_fp is not None and kms_fp.startswith("ecdsa-p256:")
        changes = [b for b in bodies if b["action_type"] == "provider_change"]
        assert len(changes) == 1
        change = changes[0]
        assert change["change"] == "checkpoint_signer" and change["old_key_available"] is True
        assert change["from"]["fingerprint"] == local.fingerprint and change["to"]["fingerprint"] == kms_fp
        assert change["to"]["key_id"] == f"aws-kms:{arn}" and change["to"]["provider"] == "audit-kms"
        by_seq = {seq: (kind, fp) for seq, kind, fp, _ in checkpoints}
        assert by_seq[change["seq"]] == ("signer_change", local.fingerprint)  # the old key signs the hand-over
        assert all(fp == kms_fp for seq, (_, fp) in by_seq.items() if seq > change["seq"])
        assert any(seq > change["seq"] for seq in by_seq)
        # Pinned with its key id: in the WAL meta and in the state dir, where `audit verify` reads it.
        pin = SignerPin.from_json(meta["signing_key"])
        assert pin is not None and (pin.key_id, pin.fingerprint) == (f"aws-kms:{arn}", kms_fp)
        assert pin.config is not None and pin.config["key_arn"] == arn and "AWS_SECRET" not in json.dumps(pin.to_dict())
        pins = json.loads((s.dirs.state_root / engine.paths.state_dir.name / "checkpoint-keys.json").read_text())
        assert [p["fingerprint"] for p in pins] == [kms_fp]

        # 3. `audit verify`, offline (the KMS is not asked): per-key counts, the countersigned change.
        run = s.cli("audit", "verify", "--dir", str(s.stack), "--format", "json")
        assert run.returncode == 0, run.stdout + run.stderr
        report = json.loads(run.stdout)
        assert report["ok"] and report["keys_pinned"] and report["unsigned_tail"] == 0
        counts = report["key_counts"]
        assert set(counts) == {local.fingerprint, kms_fp} and all(n >= 1 for n in counts.values())
        assert sum(counts.values()) == report["checkpoints"] == len(checkpoints)
        assert report["signer_changes"] == [
            {"seq": change["seq"], "from": local.fingerprint, "to": kms_fp, "countersigned": True}
        ]
        assert any(k.get("key_id") == f"aws-kms:{arn}" for k in report["pinned_keys"])
        text = s.cli("audit", "verify", "--dir", str(s.stack))
        assert text.returncode == 0 and f"key {kms_fp} (aws-kms:{arn}): {counts[kms_fp]} checkpoint(s)" in text.stdout
        assert f"signer change at seq {change['seq']}" in text.stdout and "countersigned by the old key" in text.stdout

        # 4. An exported bundle verifies offline against the KMS key as AWS hands it out (PEM).
        bundle = s.root / "bundle.jsonl"
        assert s.cli("audit", "export", "--dir", str(s.stack), "--out", str(bundle)).returncode == 0
        keys = s.root / "keys.pem"
        from cryptography.hazmat.primitives import serialization

        pem = serialization.load_der_public_key(kms_der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        keys.write_text(f"ed25519:{local.public_b64}\n" + pem.decode())
        checked = s.cli("audit", "verify-bundle", str(bundle), "--key", str(keys), "--format", "json")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert json.loads(checked.stdout)["key_counts"] == counts
        only_kms = s.root / "kms-only.pem"
        only_kms.write_bytes(pem)
        refused = s.cli("audit", "verify-bundle", str(bundle), "--key", str(only_kms), "--format", "json")
        assert refused.returncode == 1 and "not pinned" in json.loads(refused.stdout)["offender"]["problem"]

        # 5. The retired local key cannot sign history written after the change.
        forged = s.root / "forged.sqlite"
        shutil.copy(engine.wal_path, forged)
        conn = sqlite3.connect(forged)
        last_seq, last_hash, chain = conn.execute(
            "SELECT seq, record_hash, (SELECT value FROM meta WHERE key='chain_id') FROM records "
            "ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        conn.execute("DELETE FROM checkpoints WHERE seq >= ?", (last_seq,))
        signature = local.sign(checkpoint_message(chain, last_seq, last_hash))
        conn.execute("INSERT INTO checkpoints VALUES (?,?,?,?,?,?,?)",
                     (last_seq, last_hash, "2026-01-01T00:00:00.000000Z", "periodic", local.fingerprint,
                      local.public_b64, signature))  # fmt: skip
        conn.commit()
        conn.close()
        bad = s.cli("audit", "verify", "--dir", str(s.stack), "--wal", str(forged), "--format", "json")
        assert bad.returncode == 1
        assert "the chain's signer changed" in json.loads(bad.stdout)["offender"]["problem"]
    finally:
        s.cleanup()


def test_kms_down_decisions_continue_and_checkpoints_queue(tmp_path: Path) -> None:
    with moto_server(tmp_path) as kms_moto:
        arn = kms_moto.p256_key()
        s = Stack(kms_moto.env())
        try:
            engine = s.engine(stack_text(kms_block(kms_moto, arn, timeout="1s")))
            with _started(engine):
                decide(engine, 2)
                wait_for(lambda: all_signed(engine))
                os.kill(kms_moto.proc.pid, signal.SIGSTOP)  # accepts connections, answers nothing
                try:
                    seen = []

                    def queued() -> dict[str, Any] | None:
                        seen.extend(decide(engine, 2))  # decisions go on while the KMS is away
                        c = checkpoints_status(engine)
                        return c if c["queue"] >= 2 and c["last_error"] else None

                    stuck = wait_for(queued)
                    assert all(r["effect"] == "PERMIT" for r in seen) and len(seen) >= 4
                    assert stuck["unsigned_records"] > 0 and "PROVIDER_TIMEOUT" in stuck["last_error"]
                    assert stuck["signed_through"] < stuck["seq"]
                    cli = s.cli("status", "--dir", str(s.stack))
                    assert cli.returncode == 3, cli.stdout + cli.stderr  # degraded: the KMS provider is not HEALTHY
                    line = next(ln for ln in cli.stdout.splitlines() if ln.startswith("signing "))
                    assert f"aws-kms:{arn}" in line and "unsigned record(s)" in line and "PROVIDER_TIMEOUT" in line
                finally:
                    os.kill(kms_moto.proc.pid, signal.SIGCONT)
                drained = wait_for(lambda: all_signed(engine))
                assert drained["last_error"] is None and drained["seq"] >= stuck["seq"]
            run = s.cli("audit", "verify", "--dir", str(s.stack), "--require-signed", "--format", "json")
            assert run.returncode == 0, run.stdout
            assert list(json.loads(run.stdout)["key_counts"]) == [key_fingerprint(
                base64.b64encode(kms_moto.client("kms").get_public_key(KeyId=arn)["PublicKey"]).decode())]  # fmt: skip
        finally:
            s.cleanup()


def test_signing_required_denies_permits_past_the_timeout(tmp_path: Path) -> None:
    with moto_server(tmp_path) as kms_moto:
        arn = kms_moto.p256_key()
        s = Stack(kms_moto.env())
        runtime = 'signing_required = true\n  signing_timeout = "1s"'
        try:
            engine = s.engine(stack_text(kms_block(kms_moto, arn, timeout="1s"), runtime))
            with _started(engine), engine.agent("bot") as bot:
                first = bot.call(govern("search", call_id="signed"))
                assert first["effect"] == "PERMIT"
                # The permit waited for its checkpoint: it is signed by the time the reply arrives.
                assert checkpoints_status(engine)["signed_through"] >= 1
                os.kill(kms_moto.proc.pid, signal.SIGSTOP)
                try:
                    late = bot.call(govern("search", call_id="late"))
                    denied = bot.call(govern("shell/x", call_id="deny"))
                finally:
                    os.kill(kms_moto.proc.pid, signal.SIGCONT)
                assert late["effect"] == "DENY" and late["structured_denial"]["code"] == "SIGNING_UNAVAILABLE"
                assert denied["effect"] == "DENY" and denied["structured_denial"]["code"] == "POLICY_DENY"
                again = wait_for(lambda: (r := bot.call(govern("search", call_id="again")))["effect"] == "PERMIT" and r)
                assert again["effect"] == "PERMIT"
            bodies, _, _ = read_wal(engine.wal_path)
            late_record = next(b for b in bodies if b.get("call_id") == "late")
            withdrawn = [b for b in bodies if b["action_type"] == "permit_withdrawn"]
            assert late_record["effect"] == "PERMIT"  # decided and recorded …
            assert [w["withdraws"] for w in withdrawn] == [late_record["id"]]  # … then withdrawn, on record
            assert withdrawn[0]["code"] == "SIGNING_UNAVAILABLE" and withdrawn[0]["effect"] == "DENY"
        finally:
            s.cleanup()


class _started:
    """`with _started(engine):` start it (READY) and always stop it; SIGTERM drains (shutdown checkpoint)."""

    def __init__(self, engine: EngineProcess) -> None:
        self.engine = engine

    def __enter__(self) -> EngineProcess:
        self.engine.start(timeout=WAIT)
        return self.engine

    def __exit__(self, *exc: object) -> None:
        try:
            if self.engine.proc is not None and self.engine.proc.poll() is None:
                self.engine.terminate(WAIT)
        finally:
            self.engine.ensure_stopped()


def test_a_kms_down_at_start_is_pinned_later_and_a_restart_keeps_its_pin(tmp_path: Path) -> None:
    """First start with the KMS declared but not answering: checkpoints queue with no signer, the key is
    pinned (and the hand-over from the local key countersigned) once the KMS answers. A restart while the
    KMS is down keeps that pin: same signer, checkpoints queue, and drain when it is back."""
    with moto_server(tmp_path) as kms_moto:
        arn = kms_moto.p256_key()
        s = Stack(kms_moto.env())
        pid = kms_moto.proc.pid
        try:
            with _started(s.engine(stack_text())) as engine:
                decide(engine, 2)
            text = stack_text(kms_block(kms_moto, arn, timeout="1s"))
            os.kill(pid, signal.SIGSTOP)
            try:
                with _started(s.engine(text)) as engine:
                    pending = checkpoints_status(engine)
                    assert pending["signer"] is None and pending["pinning"] is True
                    assert all(r["effect"] == "PERMIT" for r in decide(engine, 3))
                    os.kill(pid, signal.SIGCONT)
                    pinned = wait_for(lambda: (c := all_signed(engine)) and c["signer"] is not None and c)
                    assert pinned["signer"] == f"aws-kms:{arn}" and pinned["pinning"] is False
                    os.kill(pid, signal.SIGSTOP)
                with _started(s.engine(text)) as engine:  # restarted while the KMS is down
                    kept = checkpoints_status(engine)
                    assert kept["signer"] == f"aws-kms:{arn}" and kept["pinning"] is False
                    assert all(r["effect"] == "PERMIT" for r in decide(engine, 3))
                    assert wait_for(lambda: checkpoints_status(engine)["queue"] >= 1)
                    os.kill(pid, signal.SIGCONT)
                    assert wait_for(lambda: all_signed(engine))["signer"] == f"aws-kms:{arn}"
            finally:
                os.kill(pid, signal.SIGCONT)
            bodies, _, _ = read_wal(engine.wal_path)
            assert [b["action_type"] for b in bodies].count("provider_change") == 1
            run = s.cli("audit", "verify", "--dir", str(s.stack), "--require-signed", "--format", "json")
            assert run.returncode == 0, run.stdout
            report = json.loads(run.stdout)
            assert [c["countersigned"] for c in report["signer_changes"]] == [True] and len(report["key_counts"]) == 2
        finally:
            s.cleanup()


def test_switching_kms_keys_is_countersigned_by_the_old_kms_key(moto: Moto) -> None:
    """The old key is a KMS key: the engine reaches it again through the provider block pinned with it
    (a provider child of its own) to sign the hand-over, then the new key signs."""
    old_arn, new_arn = moto.p256_key(), moto.p256_key()
    s = Stack(moto.env())
    try:
        with _started(s.engine(stack_text(kms_block(moto, old_arn)))) as engine:
            decide(engine, 2)
            wait_for(lambda: all_signed(engine))
        with _started(s.engine(stack_text(kms_block(moto, new_arn)))) as engine:
            decide(engine, 2)
            assert wait_for(lambda: all_signed(engine))["signer"] == f"aws-kms:{new_arn}"
        bodies, _, meta = read_wal(engine.wal_path)
        change = next(b for b in bodies if b["action_type"] == "provider_change")
        assert (change["from"]["key_id"], change["to"]["key_id"]) == (f"aws-kms:{old_arn}", f"aws-kms:{new_arn}")
        run = s.cli("audit", "verify", "--dir", str(s.stack), "--format", "json")
        assert run.returncode == 0, run.stdout
        report = json.loads(run.stdout)
        assert [c["countersigned"] for c in report["signer_changes"]] == [True]
        assert len(report["key_counts"]) == 2 and all(fp.startswith("ecdsa-p256:") for fp in report["key_counts"])
        assert SignerPin.from_json(meta["signing_key"]).key_id == f"aws-kms:{new_arn}"  # type: ignore[union-attr]
    finally:
        s.cleanup()
