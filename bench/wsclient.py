"""A lean WebSocket client for the fan-out benchmark: an asyncio protocol that parses the server's frames
itself and hands each message's payload over as bytes, undecoded.

The bench's client processes share the cores with the progress service they measure: every microsecond
they spend per message is taken from it. The `websockets` client costs about 50 µs of CPU per message
(its assembler, a future per `recv()`, UTF-8 decoding, then the bench's `json.loads`); this one costs a
few, and the bench parses each distinct payload once (see `progress_fanout.MessageCache`).

It speaks what the bench needs of RFC 6455 and RFC 7692: the opening handshake (checked), text and binary
messages (fragmented too), permessage-deflate when the server accepts the offer, answers to pings, the
closing handshake both ways, and an abrupt drop (`abort`: RST, no closing handshake) for reconnect storms.
It sends no data messages.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable, Mapping
from typing import cast

# RFC 6455 4.2.2: the server's Sec-WebSocket-Accept is the base64 SHA-1 of the key and this GUID.
ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HEADERS_END = b"\r\n\r\n"
MAX_HEADERS_BYTES = 16 * 1024
OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
FIN = 0x80
RSV1 = 0x40
MASK = 0x80
CLOSE_NORMAL = 1000
CLOSE_NO_STATUS = 1005  # what a close frame without a code means (RFC 6455 7.1.5)
CLOSE_ABNORMAL = 1006  # the connection was lost without a closing handshake
# RFC 7692 7.2.2: a message's compressed data lacks the final empty block's tail; the receiver adds it.
DEFLATE_TAIL = b"\x00\x00\xff\xff"
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
# SO_LINGER on, with a zero timeout: close() then sends a RST and skips TIME_WAIT.
LINGER_RESET = struct.pack("ii", 1, 0)

OnMessage = Callable[[bytes, float], None]


class HandshakeError(Exception):
    """The server did not switch protocols (`status` is its HTTP status), or answered nonsense (0)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}" if status else detail)
        self.status = status


def masked(opcode: int, payload: bytes) -> bytes:
    """A final client frame (clients must mask theirs, RFC 6455 5.3); only control frames here (< 126)."""
    key = os.urandom(4)
    body = bytes(byte ^ key[n % 4] for n, byte in enumerate(payload))
    return bytes((FIN | opcode, MASK | len(payload))) + key + body


def handshake_request(
    host: str, port: int, target: str, key: str, headers: Mapping[str, str], deflate: bool
) -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    if deflate:
        lines.append(f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class LeanWebSocket(asyncio.Protocol):
    """One client connection. `opened` resolves once the handshake succeeded (or fails with why);
    `closed` resolves when the connection is gone, with `close_code` and `close_reason` set.

    Every message goes to `on_message(payload, received)`, `received` being `time.time()` when the data
    that completed it was read (one clock read per read from the socket, not one per message)."""

    def __init__(self, request: bytes, key: str, on_message: OnMessage) -> None:
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.on_message = on_message
        self.close_code: int | None = None
        self.close_reason = ""
        self.deflate = False
        self.aborted = False
        self._request = request
        self._accept = base64.b64encode(hashlib.sha1(key.encode() + ACCEPT_GUID).digest()).decode()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._upgraded = False
        self._close_sent = False
        self._fragments: list[bytes] = []
        self._fragment_compressed = False
        self._inflate: zlib._Decompress | None = None
        self._reset_inflate = False  # server_no_context_takeover: a fresh window per message

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        # The common case, one whole text frame of an event per read: no buffering at all.
        if self._upgraded and not self._buffer and len(data) > 4 and data[0] == FIN | OP_TEXT:
            length = data[1]
            if length < 126 and len(data) == 2 + length:
                self.on_message(data[2:], time.time())
                return
            if length == 126 and len(data) == 4 + int.from_bytes(data[2:4]):
                self.on_message(data[4:], time.time())
                return
        self._buffer += data
        if not self._upgraded and not self._read_handshake():
            return
        self._read_frames(time.time())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = CLOSE_ABNORMAL
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)

    # --- what the subscriber does ---------------------------------------------------------------------

    def close(self, code: int = CLOSE_NORMAL) -> None:
        """Start the closing handshake; the server answers and closes the TCP connection (`closed`)."""
        if self._transport is None or self._transport.is_closing():
            return
        if self._upgraded and not self._close_sent:
            self._close_sent = True
            self._transport.write(masked(OP_CLOSE, struct.pack("!H", code)))
        else:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once, as a crash or a network cut would: a TCP RST, no closing frame."""
        if self._transport is None or self._transport.is_closing():
            return
        self.aborted = True
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        self._transport.abort()

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    # --- parsing --------------------------------------------------------------------------------------

    def _read_handshake(self) -> bool:
        end = self._buffer.find(HEADERS_END)
        if end < 0:
            if len(self._buffer) > MAX_HEADERS_BYTES:
                self._fail(HandshakeError(0, "response headers too long"))
            return False
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + len(HEADERS_END)]
        parts = head[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 101:
            self._fail(HandshakeError(status, parts[2] if len(parts) > 2 else "no reason"))
            return False
        if headers.get("sec-websocket-accept") != self._accept:
            self._fail(HandshakeError(status, "wrong Sec-WebSocket-Accept"))
            return False
        extensions = headers.get("sec-websocket-extensions", "")
        if "permessage-deflate" in extensions:
            self.deflate = True
            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
            self._reset_inflate = "server_no_context_takeover" in extensions
        self._upgraded = True
        self.opened.set_result(None)
        return True

    def _read_frames(self, received: float) -> None:
        buffer = self._buffer
        pos = 0
        size = len(buffer)
        while size - pos >= 2:
            first, second = buffer[pos], buffer[pos + 1]
            length = second & 0x7F
            start = pos + 2
            if length == 126:
                if size - start < 2:
                    break
                (length,) = struct.unpack_from("!H", buffer, start)
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                (length,) = struct.unpack_from("!Q", buffer, start)
                start += 8
            if second & MASK:
                self._fail(HandshakeError(0, "the server masked a frame"))
                return
            end = start + length
            if end > size:
                break
            self._frame(first, bytes(buffer[start:end]), received)
            pos = end
        if pos:
            del buffer[:pos]

    def _frame(self, first: int, payload: bytes, received: float) -> None:
        opcode = first & 0x0F
        if opcode in (OP_TEXT, OP_BINARY):
            if first & FIN:
                self._message(payload, bool(first & RSV1), received)
            else:
                self._fragments = [payload]
                self._fragment_compressed = bool(first & RSV1)
        elif opcode == OP_CONTINUATION:
            self._fragments.append(payload)
            if first & FIN:
                whole, self._fragments = b"".join(self._fragments), []
                self._message(whole, self._fragment_compressed, received)
        elif opcode == OP_PING and self._transport is not None and not self._close_sent:
            self._transport.write(masked(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self._closing(payload)

    def _message(self, payload: bytes, compressed: bool, received: float) -> None:
        if compressed and self._inflate is not None:
            payload = self._inflate.decompress(payload + DEFLATE_TAIL)
            if self._reset_inflate:
                self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self.on_message(payload, received)

    def _closing(self, payload: bytes) -> None:
        """The server's close frame: note its code, echo it (unless ours went first), and close."""
        if len(payload) >= 2:
            (self.close_code,) = struct.unpack_from("!H", payload)
            self.close_reason = payload[2:].decode(errors="replace")
        else:
            self.close_code = CLOSE_NO_STATUS
        if self._transport is not None and not self._close_sent:
            self._close_sent = True
            self._transport.write(masked(OP_CLOSE, payload[:2]))
        if self._transport is not None:
            self._transport.close()

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self._transport is not None:
            self._transport.abort()


async def open_websocket(
    url: str,
    headers: Mapping[str, str],
    deflate: bool,
    on_message: OnMessage,
    timeout_s: float,
    rcvbuf: int | None = None,
) -> LeanWebSocket:
    """Connect to a `ws://host:port/path?query` URL and complete the handshake within `timeout_s`;
    `rcvbuf`: a receive buffer of that size (set before connecting, so that the window is that small)."""
    scheme, _, rest = url.partition("://")
    if scheme != "ws":
        raise ValueError(f"only ws:// URLs, not {url!r}")
    authority, slash, target = rest.partition("/")
    host, _, port = authority.rpartition(":")
    key = base64.b64encode(os.urandom(16)).decode()
    request = handshake_request(host, int(port), slash + target, key, headers, deflate)
    loop = asyncio.get_running_loop()
    sock = None
    if rcvbuf is not None:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
    async with asyncio.timeout(timeout_s):
        if sock is not None:
            try:
                await loop.sock_connect(sock, (host, int(port)))
            except BaseException:
                sock.close()
                raise
            _, protocol = await loop.create_connection(
                lambda: LeanWebSocket(request, key, on_message), sock=sock
            )
        else:
            _, protocol = await loop.create_connection(
                lambda: LeanWebSocket(request, key, on_message), host, int(port)
            )
        try:
            await protocol.opened
        except BaseException:
            protocol.abort()
            raise
    return protocol
