"""A provider child: `python -I -m faramesh.engine.providers.child --fd N --parent PID`.

It inherits one end of a socketpair as fd N, reads its configuration (secrets included) from it, loads
the one SDK its provider type needs, then answers requests until the engine closes the socket or dies.
Requests run on a small thread pool, so one slow backend round trip does not hold up a health check.
Nothing here writes a secret to stderr: failures become typed error frames whose text is redacted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import importlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from typing import Any

from faramesh.engine.providers.backend import Backend, BackendSpec
from faramesh.engine.providers.protocol import (
    MAX_SIGN_MESSAGE,
    PROTOCOL_VERSION,
    FailureCode,
    ProtocolError,
    ProviderError,
    Redactor,
    b64d,
    b64e,
    backend_module,
    encode_frame,
    error_frame,
    ok_frame,
    recv_frame,
)

WORKERS = 4
EX_CONFIG = 78  # sysexits.h: the configuration cannot work; the host does not restart on it


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to kill us when the engine dies (Linux), then close the race where it already
    died before we asked. EOF on the socket is the portable backstop."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(0)


def _str_arg(args: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = args.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ProviderError(FailureCode.BAD_REQUEST, f"`{key}` must be a non-empty string")
    return value


class Child:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.write_lock = threading.Lock()
        self.backend: Backend | None = None
        self.redact = Redactor()

    def send(self, frame: dict[str, Any]) -> None:
        try:
            data = encode_frame(frame)
        except ProtocolError as exc:
            data = encode_frame(error_frame(int(frame.get("id", 0)), FailureCode.BAD_REQUEST, str(exc)))
        with self.write_lock:
            self.sock.sendall(data)

    # ---- configure
    def configure(self, request: Mapping[str, Any]) -> dict[str, Any]:
        request_id = int(request.get("id", 0))
        if request.get("verb") != "configure":
            return error_frame(request_id, FailureCode.PROTOCOL, "the first request must be `configure`")
        args = request.get("args")
        if not isinstance(args, dict):
            return error_frame(request_id, FailureCode.PROTOCOL, "`configure` needs an object of arguments")
        config = args.get("config")
        ambient = args.get("ambient") or {}
        secret_fields = args.get("secret_fields") or []
        if not isinstance(config, dict) or not isinstance(ambient, dict) or not isinstance(secret_fields, list):
            return error_frame(request_id, FailureCode.PROTOCOL, "`configure` arguments have the wrong shape")
        for key in secret_fields:
            value = config.get(key)
            if isinstance(value, str):
                self.redact.add(value)
        for value in ambient.values():
            if isinstance(value, str):
                self.redact.add(value)
        name = str(args.get("name", "?"))
        spec = BackendSpec(name=name, config=config, ambient=ambient, redact=self.redact)
        module_name = backend_module(config)
        if module_name is None:
            return error_frame(
                request_id, FailureCode.UNSUPPORTED, f"provider type {config.get('type')!r} is not available"
            )
        try:
            module = importlib.import_module(module_name)
            self.backend = module.create(spec)
        except ProviderError as exc:
            return error_frame(request_id, exc.code, self.redact(exc.message))
        except ImportError as exc:
            return error_frame(request_id, FailureCode.CONFIG, f"cannot load {module_name}: {self.redact(str(exc))}")
        return ok_frame(request_id, {"pid": os.getpid(), "protocol": PROTOCOL_VERSION})

    # ---- requests
    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        raw_id = request.get("id")
        request_id = raw_id if isinstance(raw_id, int) else 0
        backend = self.backend
        assert backend is not None
        verb = request.get("verb")
        args = request.get("args") or {}
        try:
            if not isinstance(args, dict):
                raise ProviderError(FailureCode.BAD_REQUEST, "arguments must be an object")
            return ok_frame(request_id, self._dispatch(backend, verb, args))
        except ProviderError as exc:
            return error_frame(request_id, exc.code, self.redact(exc.message))
        except ProtocolError as exc:
            return error_frame(request_id, FailureCode.BAD_REQUEST, self.redact(str(exc)))
        except Exception as exc:  # an SDK failure the backend may know how to name
            typed = backend.classify(exc)
            if typed is None:
                detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
                typed = ProviderError(FailureCode.BACKEND, f"{type(exc).__name__}: {detail}".rstrip(": "))
            return error_frame(request_id, typed.code, self.redact(typed.message))

    def _dispatch(self, backend: Backend, verb: Any, args: Mapping[str, Any]) -> dict[str, Any]:
        if verb == "health":
            return {"detail": backend.health()}
        if verb == "get_secret":
            name = _str_arg(args, "name", required=True)
            assert name is not None
            value, version = backend.get_secret(name, _str_arg(args, "field"), _str_arg(args, "version"))
            return {"value": value, "version": version}
        if verb == "sign":
            message = b64d(args.get("message"), "message")
            if len(message) > MAX_SIGN_MESSAGE:
                raise ProviderError(FailureCode.BAD_REQUEST, f"a signed message is at most {MAX_SIGN_MESSAGE} bytes")
            key_id, algorithm, signature = backend.sign(message)
            return {"key_id": key_id, "algorithm": algorithm, "signature": b64e(signature)}
        if verb == "get_public_key":
            key_id, algorithm, der = backend.get_public_key(_str_arg(args, "key_id"))
            return {"key_id": key_id, "algorithm": algorithm, "der": b64e(der)}
        if verb == "emit":
            records = args.get("records")
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ProviderError(FailureCode.BAD_REQUEST, "`records` must be a list of objects")
            return {"accepted": backend.emit(records)}
        raise ProviderError(FailureCode.BAD_REQUEST, f"unknown verb {verb!r}")

    def serve(self) -> int:
        first = recv_frame(self.sock)
        if first is None:
            return 0
        reply = self.configure(first)
        self.send(reply)
        if not reply["ok"]:
            return EX_CONFIG
        with concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="provider") as pool:
            while True:
                request = recv_frame(self.sock)
                if request is None:
                    # The engine closed its end: leave at once, even with a backend call in flight.
                    os._exit(0)
                pool.submit(self._answer, request)

    def _answer(self, request: Mapping[str, Any]) -> None:
        try:
            self.send(self.handle(request))
        except OSError:
            os._exit(0)  # the engine is gone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faramesh.engine.providers.child")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    ns = parser.parse_args(argv)
    _die_with_parent(ns.parent)
    # Ctrl-C in a terminal reaches the whole process group; the engine decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=ns.fd)
    try:
        return Child(sock).serve()
    except ProtocolError as exc:
        print(f"provider child: {exc}", file=sys.stderr)
        return 1
    except OSError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
