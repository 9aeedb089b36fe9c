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


@pytest.mark.parametrize("packed_p50", [50.0, 500.0])
def test_fp32_latency_goal_takes_the_faster_fp32_setting_and_names_it(packed_p50):
    r = json.loads((RESULTS / "vm.json").read_text())
    plain = r["suites"]["ours/fp32"]
    packed = json.loads(json.dumps(plain))
    packed["image_latency"]["p50_ms"] = packed_p50
    packed["peak_rss_mb"] = 1234.0
    r["suites"]["ours/fp32-packed"] = packed
    r["precisions"] = ["fp32", "fp32-packed", "bf16", "int8"]
    for kind in ("image", "text"):
        r["accuracy"]["clip"][f"{kind} ours/fp32-packed"] = {"min": 0.99999, "mean": 1.0}
    rows = report.build_figures(r)
    by_key = {row.key: row for row in rows}
    hf = r["suites"]["hf/fp32"]["image_latency"]["p50_ms"]
    goal, other = by_key["image_latency_fp32"], by_key["image_latency_fp32_other"]
    faster, slower = sorted([packed_p50, plain["image_latency"]["p50_ms"]])
    assert goal.ratio == pytest.approx(hf / faster) and other.ratio == pytest.approx(hf / slower)
    assert ("packed weights" in goal.figure) == (packed_p50 < plain["image_latency"]["p50_ms"])
    assert "1234 MB" in goal.note and other.goal == "–"
    assert {"text_latency", "text_latency_packed"} <= set(by_key)
    assert by_key["image_throughput_fp32"].ratio == pytest.approx(
        plain["image_throughput"]["per_s"] / r["suites"]["hf/fp32"]["image_throughput"]["per_s"])


def test_models_results_rebuild_into_a_table():
    """bench/models_report.py on the committed run of bench/models.py: ratios, the best mode and every goal are
    computed from the figures they name."""
    from bench import models_report

    r = json.loads((RESULTS / "models-vm.json").read_text())
    for name, m in r["models"].items():
        s = models_report.summarize(name, m)
        ref, ours = m["ref"]["fp32"]["per_s"], m["ours"]
        assert s["ratio"]["fp32"] == pytest.approx(ours["fp32"]["per_s"] / ref)
        assert s["fp32_met"] == (s["ratio"]["fp32"] >= models_report.GOAL_FP32[m["kind"]])
        eligible = ["fp32"] + [p for p in ("bf16", "int8") if m["accuracy"][f"{p}_vs_fp32"]["min"] >= 0.99]
        best = max(eligible, key=lambda p: ours[p]["per_s"])
        assert s["best_mode"] == best and s["best_ratio"] == pytest.approx(ours[best]["per_s"] / ref)
        assert s["best_met"] == (s["best_ratio"] >= models_report.GOAL_BEST)
    md = models_report.markdown(r)
    assert md.count("\n| ") >= 1 + 4 * len(r["models"])
    assert all(models_report.LABELS[name] in md for name in r["models"])
