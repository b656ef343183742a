"""A misbehaving HTTP server on 127.0.0.1 for fault-injection tests (test support).

Each connection is handled by ``behaviour(request) -> None`` which writes raw bytes to the
socket: trickle a reply, cut a body short, echo the Authorization header in a 401, ... The
server is bounded: it serves at most ``max_connections`` connections and stops by itself after
``lifetime_s`` seconds; every write loop in the behaviours below is bounded too.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Request:
    """What the client sent: request line, headers (lower-case names), body, and the socket."""

    line: str
    headers: dict[str, str]
    body: bytes
    sock: socket.socket = field(repr=False)

    def json(self) -> dict:
        return json.loads(self.body or b"{}")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def reply(status: int, payload: dict | bytes, *, length: int | None = None) -> bytes:
    """Raw HTTP/1.1 response bytes; ``length`` overrides Content-Length (to announce more than is sent)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    head = (
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def completion(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


class BadServer:
    """``with BadServer(behaviour) as s: ... s.url ...``; ``s.requests`` lists what arrived."""

    def __init__(self, behaviour: Callable[[Request], None], *, max_connections: int = 50, lifetime_s: float = 30.0):
        self.behaviour = behaviour
        self.max_connections = max_connections
        self.lifetime_s = lifetime_s
        self.requests: list[Request] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"

    def _serve(self) -> None:
        deadline = time.monotonic() + self.lifetime_s
        served = 0
        while not self._stop.is_set() and served < self.max_connections and time.monotonic() < deadline:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # timeout: check the stop conditions again
                continue
            served += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        self._sock.close()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        try:
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 1 << 20:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
            need = int(headers.get("content-length", 0))
            while len(body) < need:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                body += chunk
            request = Request(lines[0], headers, body, conn)
            self.requests.append(request)
            self.behaviour(request)
        except OSError:
            pass  # the client hung up (e.g. its deadline passed): nothing to do
        finally:
            conn.close()

    def __enter__(self) -> BadServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def trickle(request: Request, *, every_s: float = 0.5, max_bytes: int = 40) -> None:
    """Send a valid reply one byte every ``every_s`` seconds (at most ``max_bytes`` bytes)."""
    for byte in reply(200, completion("A"))[:max_bytes]:
        request.send(bytes([byte]))
        time.sleep(every_s)
