"""Every entry point that runs the engine sets OMP_WAIT_POLICY=PASSIVE and GOMP_SPINCOUNT=50000 before torch loads
(unless the user set one of them): ``arrowengine serve``, ``embed`` in-process, ``convert``, ``inspect``, Ray's engine actors, the benchmarks.

One subprocess runs each entry point in turn with an import hook that stops it where torch would load and
records the environment at that moment (torch never actually loads, so each entry point is checked from a
clean start); an entry point that never loads torch is checked when it returns.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import engine

ROOT = Path(__file__).resolve().parents[1]
NOT_LOADED = "<torch not loaded>"

HARNESS = textwrap.dedent('''
    import importlib.abc, importlib.util, json, os, runpy, sys

    seen = []

    def settings():
        return "/".join(str(os.environ.get(k)) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))

    class TorchLoads(BaseException):
        """Where torch would load: the entry point stops there."""

    class Stop(importlib.abc.Loader):
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            seen.append(settings())
            raise TorchLoads()

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            return importlib.util.spec_from_loader(name, Stop()) if name == "torch" else None

    sys.meta_path.insert(0, Hook())
    tmp = sys.argv[1]

    def cli(*argv):
        from flight_client.cli import main
        return lambda: main(list(argv))

    def script(name, *argv):
        def run():
            sys.argv = [name, *argv]
            runpy.run_path(os.path.join("bench", name), run_name="__main__")
        return run

    def ray_actor():
        from flight_client.ray import EmbedSpec, EngineEmbedActor
        EngineEmbedActor(EmbedSpec(column="text", kind="text", model_dir=tmp + "/model"))

    entries = {
        "import bench": lambda: __import__("bench"),  # first: a package is imported once
        "serve": cli("serve", "--port", "0", "m=" + tmp + "/model"),
        "serve, the user's own value": cli("serve", "--port", "0", "m=" + tmp + "/model"),
        "embed in-process": cli("embed", tmp + "/in.parquet", tmp + "/out", "--kind", "text", "--model",
                                tmp + "/model", "--no-progress"),
        "convert": cli("convert", tmp + "/checkpoint", tmp + "/converted"),
        "inspect": cli("inspect", tmp + "/model"),
        "ray engine actor": ray_actor,
        "bench/serving.py": script("serving.py", "--help"),
        "bench/load.py": script("load.py", "--help"),
        "bench/gpu_text.py": script("gpu_text.py", "--help"),
        "bench/bulk_job.py": script("bulk_job.py", "--help"),
    }
    results = {}
    for name, entry in entries.items():
        os.environ.pop("OMP_WAIT_POLICY", None)
        os.environ.pop("GOMP_SPINCOUNT", None)
        if name.endswith("the user's own value"):
            os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
        seen.clear()
        try:
            entry()
        except (TorchLoads, SystemExit):
            pass
        results[name] = {"at_torch_load": seen[0] if seen else "NOT_LOADED",
                         "after": settings()}
    print("RESULTS " + json.dumps(results))
''').replace('"NOT_LOADED"', repr(NOT_LOADED))


def test_every_entry_point_sets_the_omp_defaults_before_torch_loads(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "checkpoint").mkdir()
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "in.parquet")
    env = {k: v for k, v in os.environ.items() if k not in engine.THREAD_DEFAULTS}
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([sys.executable, "-c", HARNESS, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    results = json.loads(lines[-1][len("RESULTS "):])
    # these load torch on the way (the hook stops them there): the setting must be in place by then
    for name in ("serve", "embed in-process", "inspect", "ray engine actor", "bench/load.py"):
        assert results[name]["at_torch_load"] == "PASSIVE/50000", (name, results[name])
    # the user's own policy: no spin count of ours cuts it short
    assert results["serve, the user's own value"] == {"at_torch_load": "ACTIVE/None", "after": "ACTIVE/None"}
    for name, result in results.items():
        if "user's own" not in name:
            assert result["after"] == "PASSIVE/50000", (name, result)
            assert result["at_torch_load"] in ("PASSIVE/50000", NOT_LOADED), (name, result)


def test_set_thread_defaults_keeps_what_the_user_set(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    engine.set_thread_defaults()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "1000")
    engine.set_thread_defaults()
    assert os.environ["GOMP_SPINCOUNT"] == "1000" and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("GOMP_SPINCOUNT")
    engine.set_thread_defaults()
    assert (os.environ["OMP_WAIT_POLICY"], os.environ["GOMP_SPINCOUNT"]) == ("PASSIVE", "50000")
