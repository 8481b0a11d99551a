"""A TCP proxy in front of a real service, for tests that need a connection to break: `cut()` drops
every open connection at once; `drop_next_response()` lets the next request through to the service
and closes the client's connection before the answer reaches it (the request was served, the client
never hears of it)."""

from __future__ import annotations

import asyncio
import contextlib

CHUNK = 65536


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._drop_responses = 0
        self.connections = 0
        self.dropped_responses = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every open connection (a reset, as a network failure would)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def drop_next_response(self) -> None:
        self._drop_responses += 1

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            client_writer.transport.abort()
            return
        drop = self._drop_responses > 0
        if drop:
            self._drop_responses -= 1
        self._writers.update({client_writer, upstream_writer})
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer),
            self._pipe(upstream_reader, client_writer, drop=drop),
            return_exceptions=True,
        )
        for writer in (client_writer, upstream_writer):
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, drop: bool = False
    ) -> None:
        try:
            while data := await reader.read(CHUNK):
                if drop:
                    # The service answered: the client's connection goes before the answer does.
                    self.dropped_responses += 1
                    writer.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()
