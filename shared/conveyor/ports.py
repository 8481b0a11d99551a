"""Whether a server could listen on a port: the one check the embedded Kafka and the progress
service's processes make before they start."""

from __future__ import annotations

import socket


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on host:port, SO_REUSEPORT or not: bound without it, a socket is refused
    a port that any other socket listens on. SO_REUSEADDR as servers set it (Java's, uvicorn's), so
    connections lingering in TIME_WAIT from an earlier run do not count as taking the port."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
