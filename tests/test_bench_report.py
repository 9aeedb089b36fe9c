"""bench/report.py on the committed results: every goal row is computed from the suites it names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


@pytest.mark.parametrize("name", ["vm", "h200"])
def test_committed_results_rebuild_into_a_table(name, tmp_path):
    r = json.loads((RESULTS / f"{name}.json").read_text())
    rows = {row.key: row for row in report.build_figures(r)}
    s = r["suites"]
    if name == "h200":
        assert {"gpu_e2e", "gpu_model_only", "cos_fp16", "cos_bf16"} <= set(rows)
        best = max(("fp16", "bf16"), key=lambda p: s[f"ours/{p}"]["image_throughput"]["per_s"])
        e2e = s[f"ours/{best}"]["image_throughput"]["per_s"] / s["hf/fp16"]["image_throughput"]["per_s"]
        assert rows["gpu_e2e"].ratio == pytest.approx(e2e) and rows["gpu_e2e"].met == (e2e >= 15)
        assert "image_throughput_limit" not in rows  # CPU goals are not applied to a GPU run
    else:
        assert {"warm_load", "image_throughput_fp32", "rss_fp32", "flight"} <= set(rows)
        ratio = s["ours/fp32"]["image_throughput"]["per_s"] / s["hf/fp32"]["image_throughput"]["per_s"]
        assert rows["image_throughput_fp32"].ratio == pytest.approx(ratio)
        assert not any(key.startswith("gpu_") for key in rows)
    md = report.markdown(r, list(rows.values()))
    assert md.count("\n| ") > len(rows)
