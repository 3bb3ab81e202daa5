"""The floor: a minimal asyncio JSON echo server on a Unix socket, run as its own process.

Per line: json.loads, json.dumps, write the line back. Same event loop, same stream API and the same
client as the engine measurement, so the difference between the two is what the engine adds on top
of "an asyncio process that parses and re-encodes JSON" (pipeline, WAL commit, reply building).

    .venv/bin/python bench/echo_server.py SOCKET     # prints "ready" once bound; SIGTERM stops it
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(json.dumps(json.loads(line)).encode() + b"\n")
            await writer.drain()
    except (ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def serve(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await asyncio.start_unix_server(_handle, path=path, limit=1024 * 1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    async with server:
        await stop.wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: echo_server.py SOCKET\n")
        return 64
    asyncio.run(serve(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
