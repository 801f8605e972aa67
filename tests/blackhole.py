"""A TCP relay that can swallow traffic, the way a network that drops packets does: while it is cut, bytes sent either
way are read and thrown away, and connections stay open. A request lost that way leaves its sender waiting for an
answer that will never come, which a server that is merely stopped (SIGSTOP) cannot show: its kernel keeps the
request and the server answers it once it runs again."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.private_redis import free_port


class Blackhole:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.cut = False
        #: Reads from the server still to throw away while requests pass (a reply lost after the server ran its
        #: request), and those thrown away, for a test to check that they were the reply it meant.
        self.drop_replies = 0
        self.dropped: list[bytes] = []
        #: Replies still to pass before the connection that reads the next one is cut instead, that reply thrown
        #: away (a reply lost with its connection, after the server ran the request); ``None``: none to cut.
        self.sever_after: int | None = None
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._sockets: list[socket.socket] = [self._server]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst, replies in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, replies), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if replies and self._severing(data):
                    break
                if replies and self._dropping(data):
                    continue
                if not self.cut:
                    dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _severing(self, data: bytes) -> bool:
        with self._lock:
            if self.sever_after is None:
                return False
            if self.sever_after > 0:
                self.sever_after -= 1
                return False
            self.sever_after = None
            self.dropped.append(data)
            return True

    def _dropping(self, data: bytes) -> bool:
        with self._lock:  # one pump per direction and connection: several may read at once
            if self.drop_replies <= 0:
                return False
            self.drop_replies -= 1
            self.dropped.append(data)
            return True

    def close(self) -> None:
        with self._lock:
            for s in self._sockets:
                # Closing alone wakes neither a blocked accept() nor a blocked recv() on Linux.
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def relayed(url: str, relay: Blackhole) -> str:
    """``url`` with its host and port replaced by the relay's."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{relay.port}"))


@pytest.fixture
def blackhole() -> Iterator[Callable[[str], tuple[Blackhole, str]]]:
    """Relays in front of a server: ``blackhole(url)`` gives the relay and the URL that goes through it."""
    made: list[Blackhole] = []

    def make(url: str) -> tuple[Blackhole, str]:
        parts = urlsplit(url)
        made.append(relay := Blackhole((parts.hostname or "127.0.0.1", parts.port or 0)))
        return relay, relayed(url, relay)

    yield make
    for relay in made:
        relay.close()
