"""A tiny OpenAI-compatible chat server on 127.0.0.1 for tests and offline demos.

It answers ``POST /v1/chat/completions`` with whatever ``responder(text, body)`` returns, where
``text`` is the user message's text; a list of strings is sent as that many choices (a request
with ``n``); a responder that returns an ``int`` gets that HTTP status instead (e.g. 500 for the
items a test wants to fail). It is bounded: it stops by itself after ``max_requests``
requests or ``lifetime_s`` seconds, so a forgotten server cannot linger.

    with FakeChatServer(lambda text, body: "A") as server:
        backend = OpenAIBackend(BackendConfig(kind="openai", model="fake", url=server.url))
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeChatServer"]

Responder = Callable[[str, dict[str, Any]], str | list[str] | int]


def _user_text(body: dict[str, Any]) -> str:
    parts = []
    for message in body.get("messages", []):
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(c.get("text", "") for c in content if c.get("type") == "text")
    return "\n".join(parts)


class FakeChatServer:
    """Serve canned chat completions on a free local port, in a background thread.

    Attributes:
        url: base URL to give a client (``http://127.0.0.1:<port>/v1``).
        requests: bodies received, in order (thread-safe appends).
        fail_first: answer the first N requests with HTTP 500 (to test retries).
    """

    def __init__(
        self,
        responder: Responder,
        *,
        fail_first: int = 0,
        max_requests: int = 1000,
        lifetime_s: float = 60.0,
    ):
        self.responder = responder
        self.fail_first = fail_first
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(lifetime_s, self.stop)
        self._timer.daemon = True
        self._stopped = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append(body)
                    count = len(server.requests)
                if count >= server.max_requests:
                    threading.Thread(target=server.stop, daemon=True).start()
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": f"no route {self.path}"})
                elif count <= server.fail_first:
                    self._send(500, {"error": "injected failure"})
                else:
                    text = server.responder(_user_text(body), body)
                    if isinstance(text, int):
                        self._send(text, {"error": "scripted failure"})
                    else:
                        texts = text if isinstance(text, list) else [text]
                        choices = [
                            {"index": i, "message": {"role": "assistant", "content": t}} for i, t in enumerate(texts)
                        ]
                        self._send(200, {"choices": choices})

            def _send(self, code: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def start(self) -> FakeChatServer:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        """Shut down (idempotent)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
