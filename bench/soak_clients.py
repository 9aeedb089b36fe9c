"""The soak's clients: one thread per client, each with its own Flight connection and one role, repeated
until the deadline, and the run's thread-safe counters (:class:`Tally`).

Roles (:data:`ROLES`; they cycle for more than 8 clients):

    texts         EmbeddingClient.embed_texts: 1-64 rows, captions, over-long texts (cut by the tokenizer),
                  unicode, empty strings, null rows (row errors)
    images        embed_images of 1-12 real photos (256-2048 px, JPEG/PNG/WebP) plus truncated,
                  empty, non-image and null rows (row errors)
    tokens        embed_tokens: id rows of 1..max positions, plus out-of-vocabulary, negative, empty,
                  too long and null rows (row errors)
    cancel        raw pyarrow.flight do_exchange of 4-12 text or image batches, cancelled after 1..K-1 results
    bad-request   request-level faults: unknown model, missing column, wrong column type, wrong modality,
                  bad JSON, unknown input kind, a batch over --max-batch-rows (each must fail with its code)
    disconnect    a child process opens 1-3 exchanges (nothing sent, schema only, text or image batches
                  sent) and is SIGKILLed: connections that drop without a cancel or a half-close
    stream        EmbeddingClient.embed_stream of 2-6 text batches with a passthrough id column
    image-stream  embed_stream of 2-5 image batches (with bad rows) and a passthrough id column

Every answer goes through :func:`bench.soak_inputs.check_rows`; stream passthrough ids must be echoed and
request faults must fail with their protocol code. Anything else counts as an unexpected failure.
"""
from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any, Callable

from bench.soak_inputs import Pools, Served, Unexpected, check_rows, draw_images, draw_texts, draw_tokens
from bench.soak_rule import MB

log = logging.getLogger("bench.soak")

ROLES = ("texts", "images", "tokens", "cancel", "bad-request", "disconnect", "stream", "image-stream")
CALL_TIMEOUT_S = 60.0
BUSY_RETRIES = 8  # "server busy" answers in a row a client takes before it counts one as a failure
SLOW_S = 5.0  # a request slower than this is logged and listed as slow
PAUSES = {"cancel": (0.05, 0.2), "bad-request": (0.1, 0.3), "disconnect": (1.0, 2.0)}  # s between requests
DEFAULT_PAUSE = (0.0, 0.05)

_DISCONNECT_STATES = ("opened", "sent schema", "sent texts", "sent texts", "sent images")
# Run by the disconnect role in a child process: open the calls, print "ready", wait for SIGKILL.
_DISCONNECT_CHILD = """
import json, sys, time, pathlib, pyarrow as pa, pyarrow.flight as fl
spec = json.loads(sys.argv[1])
texts = pa.array(["a photo of a cat"] * 24 + ["a long caption that goes on " * 200] * 4)
images = sorted(pathlib.Path(spec["image"]).iterdir())[:6] if spec["image"] else []
keep = []
for state, command in spec["calls"]:
    conn = fl.connect(spec["location"])
    writer, reader = conn.do_exchange(fl.FlightDescriptor.for_command(command))
    keep.append((conn, writer, reader))
    if state == "opened":
        continue
    if state == "sent images":
        batch = pa.record_batch({"image": pa.array([p.read_bytes() for p in images], pa.binary())})
    else:
        batch = pa.record_batch({"text": texts})
    writer.begin(batch.schema)
    if state != "sent schema":
        for _ in range(spec["batches"]):
            writer.write_batch(batch)
print("ready", flush=True)
time.sleep(120)
"""


def row_error_kind(message: str) -> str:
    """A short, bounded label for a row error message: its head, numbers as N."""
    head = re.split(r"[:;(]", message, maxsplit=1)[0].strip()
    return re.sub(r"\d+", "N", head)[:48]


class Tally:
    """Thread-safe counters of the whole run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.roles: dict[str, Counter] = {}
        self.latency: dict[str, list[float]] = {}
        self.row_errors: Counter = Counter()      # expected row errors, by kind
        self.request_errors: Counter = Counter()  # expected request-level errors, by code
        self.unexpected: Counter = Counter()
        self.examples: list[str] = []
        self.busy_answers = 0                     # "server busy" answers to raw calls, retried
        self.slow: list[str] = []                 # requests over SLOW_S

    def slow_request(self, role: str, seconds: float, at: float, what: str) -> None:
        line = f"[{role}] {what}: {seconds:.1f}s (ended at {at:.0f}s)"
        with self._lock:
            self.slow.append(line)
        log.warning("slow request %s", line)

    def busy(self) -> None:
        with self._lock:
            self.busy_answers += 1

    def done(self, role: str, seconds: float, **counts: int) -> None:
        with self._lock:
            self.roles.setdefault(role, Counter()).update(counts)
            self.latency.setdefault(role, []).append(seconds)

    def row_error(self, message: str) -> None:
        with self._lock:
            self.row_errors[row_error_kind(message)] += 1

    def request_error(self, code: str) -> None:
        with self._lock:
            self.request_errors[code] += 1

    def fail(self, role: str, kind: str, detail: str) -> None:
        with self._lock:
            self.unexpected[kind] += 1
            self.roles.setdefault(role, Counter())["unexpected"] += 1
            if len(self.examples) < 30:
                self.examples.append(f"[{role}] {kind}: {detail[:400]}")
        log.warning("unexpected [%s] %s: %s", role, kind, detail[:400])

    def total(self, key: str) -> int:
        with self._lock:
            return sum(c[key] for c in self.roles.values())


class Client:
    """One soak client: a role, a connection, a random generator; :meth:`run` loops until the deadline."""

    def __init__(self, index: int, role: str, location: str, served: Served, pools: Pools, tally: Tally,
                 deadline: float, seed: int) -> None:
        from flight_client import EmbeddingClient

        self.index, self.role, self.location = index, role, location
        self.served, self.pools, self.tally, self.deadline = served, pools, tally, deadline
        self.rng = random.Random(seed)
        self.client = EmbeddingClient(location, timeout_s=CALL_TIMEOUT_S)
        self.t0 = time.monotonic()
        self.what = ""  # the request in progress, for the slow-request log
        self.busy_in_a_row = 0

    def run(self) -> None:
        step = getattr(self, "do_" + self.role.replace("-", "_"))
        pause = PAUSES.get(self.role, DEFAULT_PAUSE)
        try:
            while time.monotonic() < self.deadline:
                if self._attempt(step):
                    continue  # answered busy: its backoff was the pause
                time.sleep(self.rng.uniform(*pause))
        finally:
            self.client.close()

    def _attempt(self, step: Callable[[], dict[str, int]]) -> bool:
        """One request of the role, counted in the tally; True when the server was busy and it is to be retried."""
        import pyarrow as pa
        import pyarrow.flight as flight

        from flight_server import protocol

        t0 = time.monotonic()
        try:
            counts = step()
        except Unexpected as exc:
            self.tally.fail(self.role, exc.kind, str(exc))
        except flight.FlightTimedOutError as exc:
            self.tally.fail(self.role, "timeout", f"no answer in {CALL_TIMEOUT_S:g}s: {exc}")
        except flight.FlightUnavailableError as exc:
            if protocol.error_code(exc) == protocol.CODE_BUSY and self.busy_in_a_row < BUSY_RETRIES:
                # All exchange slots taken: the disconnect role's child holds up to 3 at once, and a cancelled or
                # killed call keeps its slot until the server sees the cancel. As EmbeddingClient does, back off.
                self.busy_in_a_row += 1
                self.tally.busy()
                time.sleep(0.2 * 2 ** min(self.busy_in_a_row, 4) * self.rng.uniform(0.5, 1.0))
                return True
            self.tally.fail(self.role, "unavailable", str(exc)[:300])
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            self.tally.fail(self.role, type(exc).__name__, str(exc)[:300])
        except Exception as exc:  # a bug in the check itself must show, not kill the thread
            self.tally.fail(self.role, f"client {type(exc).__name__}", repr(exc)[:300])
        else:
            self.busy_in_a_row = 0
            seconds = time.monotonic() - t0
            self.tally.done(self.role, seconds, **counts)
            if seconds > SLOW_S:
                self.tally.slow_request(self.role, seconds, time.monotonic() - self.t0, self.what)
        return False

    # -- helpers
    def _pick(self, models: list[str]) -> str:
        return self.rng.choice(models)

    def _count_errors(self, errors: list) -> int:
        failed = [e for e in errors if e is not None]
        for e in failed:
            self.tally.row_error(e)
        return len(failed)

    def _checked(self, kind: str, model: str, emb, errors: list, expected: list) -> dict[str, int]:
        """The counts of one single-batch request, once its answer passed the checks."""
        check_rows(self.pools, self.served, kind, model, emb, errors, expected)
        return {"requests": 1, "batches": 1, "rows": len(expected), "row_errors": self._count_errors(errors)}

    # -- roles
    def do_texts(self) -> dict[str, int]:
        model = self._pick(self.served.text)
        rows, expected = draw_texts(self.rng, self.pools, self.rng.choice((1, 2, 3, 5, 8, 16, 32, 64)))
        self.what = f"texts/{model} {len(rows)} rows, {sum(len(r or '') for r in rows):,} characters"
        emb, errors = self.client.embed_texts(rows, model=model, errors="return")
        return self._checked("text", model, emb, errors, expected)

    def do_images(self) -> dict[str, int]:
        model = self._pick(self.served.image)
        rows, expected = draw_images(self.rng, self.pools, self.rng.randint(1, 12))
        self.what = f"images/{model} {len(rows)} rows, {sum(len(r or b'') for r in rows) / MB:.1f} MB"
        emb, errors = self.client.embed_images(rows, model=model, errors="return")
        return self._checked("image", model, emb, errors, expected)

    def do_tokens(self) -> dict[str, int]:
        model = self._pick(self.served.text)
        n = self.rng.choice((1, 2, 4, 8, 16, 32))
        rows, expected = draw_tokens(self.rng, self.pools, self.served, model, n)
        self.what = f"tokens/{model} {len(rows)} rows, {sum(len(r or []) for r in rows):,} ids"
        emb, errors = self.client.embed_tokens(rows, model=model, errors="return")
        return self._checked("tokens", model, emb, errors, expected)

    def do_stream(self) -> dict[str, int]:
        model = self._pick(self.served.text)
        parts = [draw_texts(self.rng, self.pools, self.rng.choice((1, 4, 16, 48)))
                 for _ in range(self.rng.randint(2, 6))]
        return self._stream("text", model, parts)

    def do_image_stream(self) -> dict[str, int]:
        model = self._pick(self.served.image)
        parts = [draw_images(self.rng, self.pools, self.rng.randint(1, 8), bad_share=0.1)
                 for _ in range(self.rng.randint(2, 5))]
        return self._stream("image", model, parts)

    def _stream(self, kind: str, model: str, parts: list[tuple[list, list]]) -> dict[str, int]:
        """embed_stream of one batch per part, with an ``id`` passthrough column that must come back."""
        import pyarrow as pa

        from flight_client.client import embeddings_to_numpy

        type_ = pa.string() if kind == "text" else pa.binary()
        batches, start = [], 0
        for rows, _ in parts:
            batches.append(pa.record_batch({"id": pa.array(range(start, start + len(rows)), pa.int64()),
                                            kind: pa.array(rows, type_)}))
            start += len(rows)
        self.what = f"{kind} stream/{model} {len(batches)} batches of {[b.num_rows for b in batches]} rows"
        out = list(self.client.embed_stream(batches, kind, passthrough=["id"], model=model))
        if len(out) != len(batches):
            raise Unexpected("wrong batch count", f"{kind} stream/{model}: sent {len(batches)} batches, "
                                                  f"got {len(out)} back")
        failed = 0
        for sent, got, (_, expected) in zip(batches, out, parts, strict=True):
            sent_ids, got_ids = sent.column("id").to_pylist(), got.column("id").to_pylist()
            if got_ids != sent_ids:
                raise Unexpected("passthrough mismatch", f"{kind} stream/{model}: ids {got_ids[:8]}... for "
                                                         f"{sent_ids[:8]}...")
            errors = got.column("error").to_pylist()
            check_rows(self.pools, self.served, kind, model, embeddings_to_numpy(got.column("embedding")), errors,
                       expected)
            failed += self._count_errors(errors)
        return {"requests": 1, "batches": len(batches), "rows": start, "row_errors": failed}

    def do_cancel(self) -> dict[str, int]:
        """Send K batches (a writer thread), read 1..K-1 results, check them, cancel the call."""
        import pyarrow as pa
        import pyarrow.flight as flight

        from flight_server import protocol

        kind, model, parts = self._cancel_parts()
        type_ = pa.binary() if kind == "image" else pa.string()
        batches = [pa.record_batch({kind: pa.array(rows, type_)}) for rows, _ in parts]
        keep = self.rng.randint(1, len(batches) - 1)
        self.what = f"cancel {kind}/{model} after {keep} of {len(batches)} batches"
        command = protocol.EmbedCommand.create(kind, model=model)
        with flight.connect(self.location) as conn:
            writer, reader = conn.do_exchange(command.descriptor(), flight.FlightCallOptions(timeout=CALL_TIMEOUT_S))
            writer.begin(batches[0].schema)

            def write() -> None:
                with contextlib.suppress(pa.ArrowException, OSError):  # the cancel ends the writes
                    for batch in batches:
                        writer.write_batch(batch)

            thread = threading.Thread(target=write, name="soak-cancel-writer", daemon=True)
            thread.start()
            try:
                rows, failed = self._read_results(reader, kind, model, [expected for _, expected in parts[:keep]])
            finally:
                reader.cancel()
                thread.join(timeout=CALL_TIMEOUT_S)
                with contextlib.suppress(pa.ArrowException, OSError):
                    writer.close()
            if thread.is_alive():
                raise Unexpected("stuck writer", "a write_batch did not return after the cancel")
        return {"requests": 1, "batches": keep, "rows": rows, "row_errors": failed, "cancelled": 1}

    def _cancel_parts(self) -> tuple[str, str, list[tuple[list, list]]]:
        """The cancel role's request: 4-8 image batches of 1-3 rows (40 %) or 4-12 text batches of 1-8 rows."""
        if self.served.image and self.rng.random() < 0.4:
            model = self._pick(self.served.image)
            return "image", model, [draw_images(self.rng, self.pools, self.rng.randint(1, 3), bad_share=0.1)
                                    for _ in range(self.rng.randint(4, 8))]
        model = self._pick(self.served.text)
        return "text", model, [draw_texts(self.rng, self.pools, self.rng.randint(1, 8))
                               for _ in range(self.rng.randint(4, 12))]

    def _read_results(self, reader, kind: str, model: str, expected: list[list]) -> tuple[int, int]:
        """Read and check one result per entry of ``expected``; returns (rows, row errors)."""
        from flight_client.client import embeddings_to_numpy

        rows = failed = 0
        for exp in expected:
            got = reader.read_chunk().data
            errors = got.column("error").to_pylist()
            check_rows(self.pools, self.served, kind, model, embeddings_to_numpy(got.column("embedding")), errors,
                       exp)
            rows += got.num_rows
            failed += self._count_errors(errors)
        return rows, failed

    def do_disconnect(self) -> dict[str, int]:
        """A child process opens 1-3 exchanges, leaves them in different states, and is SIGKILLed: its
        connections drop without a cancel or a half-close (closing a FlightClient in this process would
        not do that: the call outlives the client object and ends normally)."""
        calls = self._disconnect_calls()
        self.what = f"disconnect {[state for state, _ in calls]}"
        spec = json.dumps({"location": self.location, "calls": calls, "image": self.pools.image_folder,
                           "batches": self.rng.randint(1, 4)})
        child = subprocess.Popen([sys.executable, "-c", _DISCONNECT_CHILD, spec], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = child.stdout.readline() if child.stdout else ""
            if line.strip() != "ready":
                child.kill()
                _, err = child.communicate(timeout=30)
                raise Unexpected("disconnect child", f"exited before its calls were open: {err.strip()[-300:]}")
            time.sleep(self.rng.uniform(0, 0.3))  # the server is somewhere in those calls
        finally:
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            for pipe in (child.stdout, child.stderr):
                if pipe:
                    pipe.close()
        counts = Counter({"requests": len(calls), "disconnected": len(calls)})
        counts.update(f"disconnected {state}" for state, _ in calls)
        return dict(counts)

    def _disconnect_calls(self) -> list[list[str]]:
        """1-3 [state, JSON command] pairs for the disconnect child ("sent images" without image models:
        "sent texts")."""
        from flight_server import protocol

        calls = []
        for state in [self.rng.choice(_DISCONNECT_STATES) for _ in range(self.rng.randint(1, 3))]:
            image = state == "sent images" and self.served.image
            model = self._pick(self.served.image if image else self.served.text)
            command = protocol.EmbedCommand.create("image" if image else "text", model=model).to_json().decode()
            calls.append([state if image or state != "sent images" else "sent texts", command])
        return calls

    def do_bad_request(self) -> dict[str, int]:
        """One request-level fault; it must fail with its protocol code and nothing else."""
        import pyarrow.flight as flight

        from flight_server import protocol

        name, code, call = self.rng.choice(self._bad_requests())
        self.what = f"bad request: {name}"
        try:
            call()
        except flight.FlightServerError as exc:
            got = protocol.error_code(exc)
            if got != code:
                raise Unexpected("wrong error code", f"{name}: expected {code}, got {got}: {str(exc)[:200]}") from exc
            self.tally.request_error(code)
            return {"requests": 1, "request_errors": 1}
        raise Unexpected("no request error", f"{name}: the call succeeded")

    def _bad_requests(self) -> list[tuple[str, str, Callable[[], Any]]]:
        """(name, the protocol code it must fail with, the call) of every request-level fault."""
        import pyarrow as pa

        from flight_server import protocol

        text_model = self._pick(self.served.text)
        text = {"model": text_model, "input": "text"}
        cases: list[tuple[str, str, Callable[[], Any]]] = [
            ("unknown model", protocol.CODE_NOT_FOUND,
             lambda: self.client.embed_texts(["hello"], model="no-such-model")),
            ("missing column", protocol.CODE_INVALID, lambda: self._raw(text, pa.record_batch({"txt": ["hello"]}))),
            ("wrong column type", protocol.CODE_INVALID,
             lambda: self._raw(text, pa.record_batch({"text": [1, 2, 3]}))),
            ("bad JSON", protocol.CODE_INVALID,
             lambda: self._raw(b'{"input": "text", "model": ', pa.record_batch({"text": ["hello"]}))),
            ("unknown input kind", protocol.CODE_INVALID,
             lambda: self._raw({"input": "audio"}, pa.record_batch({"audio": [b"x"]}))),
            ("batch over the row limit", protocol.CODE_LIMIT,
             lambda: self._raw(text, pa.record_batch({"text": pa.array(["x"] * (self.served.max_batch_rows + 1))}))),
        ]
        if self.served.text_only:
            cases.append(("wrong modality", protocol.CODE_INVALID,
                          lambda: self._raw({"model": self._pick(self.served.text_only), "input": "image"},
                                            pa.record_batch({"image": pa.array([b"never decoded"], pa.binary())}))))
        return cases

    def _raw(self, command: dict | bytes, batch: Any) -> list:
        """do_exchange with plain pyarrow: write one batch, half-close, read everything (as the tests do)."""
        import pyarrow as pa
        import pyarrow.flight as flight

        raw = command if isinstance(command, bytes) else json.dumps(command).encode()
        with flight.connect(self.location) as conn:
            writer, reader = conn.do_exchange(flight.FlightDescriptor.for_command(raw),
                                              flight.FlightCallOptions(timeout=CALL_TIMEOUT_S))
            try:
                writer.begin(batch.schema)
                writer.write_batch(batch)
                writer.done_writing()
                return [chunk.data for chunk in reader]
            finally:
                with contextlib.suppress(pa.ArrowException):
                    writer.close()
