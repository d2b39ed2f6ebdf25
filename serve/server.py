"""uvicorn glue: listen, say where once ready, and shut down gracefully on SIGTERM.

On SIGTERM (or a first Ctrl-C) uvicorn stops accepting connections and waits for the open requests; the
engine is told at the same moment, so the requests already admitted get ``--shutdown-timeout`` seconds to
finish and are then cancelled (a plain request answers 503, a stream ends with an error event), and the
process exits 0. uvicorn re-raises the signals it caught once it has shut down; SIGTERM is not recorded for
that, since a server asked to stop that stopped cleanly has succeeded.
"""

from __future__ import annotations

import asyncio
import math
import signal
import socket
import sys

import uvicorn

from mllm_deploy.core.errors import MllmError


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a one-line error, and port 0 a free one."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise MllmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise MllmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine, shutdown_timeout: float, ready_line: str):
        super().__init__(config)
        self.engine, self.shutdown_timeout, self.ready_line = engine, shutdown_timeout, ready_line
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.started and sockets:
            host, port = sockets[0].getsockname()[:2]
            url_host = f"[{host}]" if ":" in host else host
            print(self.ready_line.format(url=f"http://{url_host}:{port}/v1"), file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        first = not self.should_exit
        if sig == signal.SIGTERM:
            self.should_exit = True
        else:
            super().handle_exit(sig, frame)
        if first and self._loop is not None:  # from the signal handler: hand over to the loop
            self._loop.call_soon_threadsafe(self.engine.begin_shutdown, self.shutdown_timeout)


def serve(app, sock: socket.socket, engine, shutdown_timeout: float, access_log: bool, ready_line: str) -> None:
    config = uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="on", loop="asyncio",
                            http="h11", server_header=False,
                            # uvicorn's own deadline, a backstop behind the engine's: it cancels what is left
                            timeout_graceful_shutdown=math.ceil(shutdown_timeout) + 2)
    Server(config, engine, shutdown_timeout, ready_line).run(sockets=[sock])
