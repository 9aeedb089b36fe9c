"""``python -m flight_server.serve`` as a subprocess on a free port, for benchmarks."""
from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    """Start a server for ``name=model_dir`` (plus ``extra_args``) and wait until it logs ``ready``."""

    def __init__(self, model_dir: Path, name: str = "bench", extra_args: tuple[str, ...] = (),
                 timeout: float = 120) -> None:
        cmd = [sys.executable, "-m", "flight_server.serve", "--port", "0", "--model", f"{name}={model_dir}",
               *extra_args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()  # keeps the pipe drained
        self.http_port: int | None = None  # with --http-port in extra_args: the OpenAI-compatible API's port
        if "--http-port" in extra_args:
            self.http_port = int(self._wait(r"HTTP API on http://[^ ]+:(\d+)/v1", timeout).group(1))
        self.port = int(self._wait(r"listening on grpc\+tcp://[^ ]+:(\d+) ", timeout).group(1))
        self._wait(r"\bready$", timeout)

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self._lines.put(line)

    def _wait(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            match = re.search(pattern, line.strip())
            if match:
                return match
        self.proc.kill()
        raise RuntimeError(f"server did not log {pattern!r}; its log:\n{''.join(seen)}")

    @property
    def location(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
