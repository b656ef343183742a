"""A vLLM server started the way a user starts one (the engine's connect mode), for the vllm tests."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A server on CPU profiles its image budget at start; on 2 loaded cores that took minutes.
START_TIMEOUT_S = 900


@contextmanager
def user_server(cmd: list[str], env: dict[str, str], log: Path) -> Iterator[str]:
    """Start ``cmd`` (a `vllm serve` line with ``--port``), wait until /health answers, yield its URL.

    The server runs in its own session and is killed with its whole group on exit; a server that
    dies or is not healthy in time fails the test with the tail of ``log``."""
    port = cmd[cmd.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"vLLM server not healthy after {START_TIMEOUT_S} s"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
