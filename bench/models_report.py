"""The table, goals and files of ``bench/models.py``: ``models-<machine>.json``, ``.md`` and, with matplotlib,
``models-<machine>-ratios.png``."""
from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

LABELS = {"siglip": "SigLIP base-patch16-224", "modernbert": "gte-modernbert-base (ModernBERT)",
          "qwen3": "Qwen3-Embedding-0.6B", "gemma": "embeddinggemma-300m"}
REF = {"hf": "HF", "st": "ST"}
GOAL_FP32 = {"image": 1.2, "text": 1.5}  # ours fp32 / HF fp32
GOAL_BEST = 3.0  # the best CPU mode / HF fp32
MIN_COSINE = 0.99  # a precision's min cosine to our fp32 for it to count as a "best mode"
PRECISIONS = ("fp32", "bf16", "int8")


def _rate(fig: dict | None, p: str) -> float | None:
    return fig[p]["per_s"] if fig and p in fig else None


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    return (f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}") + unit


def _met(value: float | None, goal: float) -> str:
    return "not measured" if value is None else "met" if value >= goal else "NOT met"


def summarize(name: str, m: dict) -> dict:
    """Rates, ratios, the best eligible mode and whether each goal is met, for one model."""
    ref = _rate(m.get("ref"), "fp32")
    ours = {p: _rate(m.get("ours"), p) for p in PRECISIONS}
    ratio = {p: (v / ref if v and ref else None) for p, v in ours.items()}
    acc = m["accuracy"]
    cos = {p: (acc.get(f"{p}_vs_fp32") or {}).get("min") for p in PRECISIONS[1:]}
    eligible = ["fp32"] + [p for p in PRECISIONS[1:] if cos[p] is not None and cos[p] >= MIN_COSINE]
    best = max((p for p in eligible if ratio[p] is not None), key=lambda p: ratio[p], default=None)
    goal_fp32 = GOAL_FP32[m["kind"]]
    return {"model": name, "kind": m["kind"], "ref_per_s": ref, "ours_per_s": ours, "ratio": ratio,
            "min_cos_to_fp32": cos, "fp32_vs_ref": acc.get("fp32_vs_ref"), "best_mode": best,
            "best_ratio": ratio.get(best) if best else None,
            "goal_fp32": goal_fp32, "fp32_met": (ratio["fp32"] or 0) >= goal_fp32 if ratio["fp32"] else None,
            "goal_best": GOAL_BEST, "best_met": (ratio[best] or 0) >= GOAL_BEST if best and ratio[best] else None}


def _inputs(m: dict) -> str:
    if m["kind"] == "image":
        i = m["inputs"]
        return f"{i['count']} JPEG photos ({i['long_side_min']}-{i['long_side_max']} px), batch {m['batch']}"
    t = m["tokens"]
    prompt = f", prompt '{m['prompt_name']}'" if m["prompt_name"] else ""
    return f"{m['n']} texts, {t['min']}-{t['max']} tokens (mean {t['mean']:.0f}){prompt}"


def table(r: dict) -> str:
    lines = ["| model (inputs) | figure | HF / ST fp32 | ArrowEngine | ratio | goal |", "|---|---|---|---|---|---|"]
    for name, m in r["models"].items():
        s = summarize(name, m)
        unit = " img/s" if m["kind"] == "image" else " texts/s"
        ref_name = REF[m["ref_system"]]
        ref = _fmt(s["ref_per_s"], unit)
        head = f"**{LABELS[name]}** ({_inputs(m)})"
        r32 = s["ratio"]["fp32"]
        lines.append(f"| {head} | throughput fp32 | {ref_name} {ref} | {_fmt(s['ours_per_s']['fp32'], unit)} | "
                     f"{_fmt(r32, 'x')} | ≥ {s['goal_fp32']}x: {_met(r32, s['goal_fp32'])} |")
        lo = " / ".join(_fmt(s["ours_per_s"][p]) for p in PRECISIONS[1:])
        lo_r = " / ".join(_fmt(s["ratio"][p], "x") for p in PRECISIONS[1:])
        lines.append(f"| | throughput bf16 / int8 | {ref_name} {ref} | {lo}{unit} | {lo_r} | – |")
        best = s["best_mode"]
        why = f"{best}" + (f", min cos {s['min_cos_to_fp32'][best]:.4f}" if best and best != "fp32" else "")
        lines.append(f"| | best CPU mode ({why}) | {ref_name} {ref} | {_fmt(s['ours_per_s'].get(best), unit)} | "
                     f"{_fmt(s['best_ratio'], 'x')} | ≥ {GOAL_BEST:g}x: {_met(s['best_ratio'], GOAL_BEST)} |")
        ref_cos = s["fp32_vs_ref"]
        cos_txt = " / ".join("–" if v is None else f"{v:.4f}" for v in s["min_cos_to_fp32"].values())
        lines.append(f"| | min cosine: ours fp32 vs {ref_name} fp32; bf16 / int8 vs ours fp32 | – | "
                     f"{'–' if not ref_cos else format(ref_cos['min'], '.5f')}; {cos_txt} | – | "
                     f"best mode ≥ {MIN_COSINE} |")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    c = r["cpu"]
    isa = ", ".join(f"{k} {'yes' if c.get(k) else 'no'}" for k in ("avx512f", "avx512_vnni", "avx512_bf16",
                                                                     "amx_bf16"))
    mm = [r.get(k) or {} for k in ("matmul_start", "matmul_end")]
    mm_txt = " / ".join(f"fp32 {x.get('fp32_gflops', float('nan')):.0f}, bf16 {x.get('bf16_gflops', float('nan')):.0f}"
                        for x in mm)
    v = r["versions"]
    git = r.get("git") or {}
    commit = git.get("commit", "?") + (" + uncommitted " + ", ".join(x.split()[-1] for x in git["modified"])
                                       if git.get("modified") else "")
    n_rounds = r.get("rounds", 1)
    rounds = f"; {n_rounds} rounds per model in alternating order, the best of each side kept" if n_rounds > 1 else ""
    out = [f"# New architectures vs HuggingFace / sentence-transformers ({r['machine']})", "",
           f"`python -m bench.models` on {r['date']}: {c['model_name']}, {c['cores']} cores ({isa}); "
           f"torch {v.get('torch')}, transformers {v.get('transformers')}, sentence-transformers "
           f"{v.get('sentence-transformers')}; commit {commit}. {r['wall_s']:.0f} s in all. Each system in its own "
           f"process: one warm-up pass, then the best of {r['passes']} timed passes{rounds}. Matmul limit (GFLOP/s, "
           f"2048², start / end of the run): {mm_txt}.", "",
           "Random weights at the real full geometries (every layer), fixed seed; stand-in tokenizers (byte-level / "
           "byte-fallback BPE trained on Python's own docs; see bench/models_text.py), real English texts from "
           "pydoc_data.topics; SigLIP on real photographs from JPEG bytes. Ratios: our rate / HF's fp32 rate. "
           "\"Best CPU mode\": the fastest of our fp32 / bf16 / int8 whose min cosine to our fp32 is ≥ 0.99.", "",
           table(r), ""]
    notes = []
    for name, m in r["models"].items():
        ref, ours = m.get("ref") or {}, m.get("ours") or {}
        if m["kind"] == "text" and "tokens" in ref and "tokens" in ours:
            t = ours["tokens"]
            if "spans" in t:  # padding-free: every Linear on the real tokens, attention padded in spans
                ours_txt = (f"{t['real']:,} real through every Linear in {t['groups']} forward passes, attention over "
                            f"{t['padded']:,} padded in {t['spans']} spans")
            else:
                ours_txt = f"{t['padded']:,} padded in {t.get('groups')} groups"
            notes.append(f"- {LABELS[name]}: tokens run, ST {ref['tokens']['padded']:,} padded for "
                         f"{ref['tokens']['real']:,} real (attention {ref.get('attn_implementation')}); ours "
                         f"{ours_txt}; tokens per word (no prompt) {m['tokens']['tokens_per_word_no_prompt']}.")
        if m["kind"] == "image" and "split_ms_per_img" in ref:
            h, o = ref["split_ms_per_img"], ours.get("split_ms_per_img", {})
            ours_txt = ", ".join(f"{p} {x['pre']:.1f} + {x['model']:.1f}" for p, x in o.items())
            notes.append(f"- {LABELS[name]}: ms per image on 8 images, preprocessing + model: HF "
                         f"({ref.get('processor')}) {h['pre']:.1f} + {h['model']:.1f}; ours {ours_txt}.")
    probes = []
    for name, m in r["models"].items():
        sides = [(REF[m["ref_system"]], m.get("ref")), ("ours", m.get("ours"))]
        seen = [(who, x) for who, x in sides if x and "probe_start_gflops" in x]
        if seen:
            probes.append(f"{LABELS[name].split(' (')[0]}: " + ", ".join(
                f"{who} {x['probe_start_gflops']:.0f} -> {x['probe_end_gflops']:.0f}" for who, x in seen))
    if notes:
        out += ["Where the time goes:", "", *notes, ""]
    if probes:
        out += ["The machine while each system ran (fp32 GFLOP/s of a 1024² matmul, before -> after; a shared host "
                "shows as a drop): " + "; ".join(probes) + ".", ""]
    if r.get("charts"):
        out += [f"![ratios]({r['charts'][0]})", ""]
    if r["failures"]:
        out += ["Failures: " + "; ".join(r["failures"]), ""]
    return "\n".join(out)


def chart(r: dict, path: Path) -> list[str]:
    """Bars of our rate / HF's per model and precision, with the goals; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no PNG chart (pip install matplotlib)")
        return []
    names = list(r["models"])
    sums = [summarize(n, r["models"][n]) for n in names]
    fig, ax = plt.subplots(figsize=(1.9 * len(names) + 2, 4))
    width = 0.26
    for j, p in enumerate(PRECISIONS):
        xs = [i + (j - 1) * width for i in range(len(names))]
        ys = [s["ratio"][p] or 0 for s in sums]
        bars = ax.bar(xs, ys, width, label=f"ours {p}")
        ax.bar_label(bars, labels=[f"{y:.1f}x" for y in ys], fontsize=7)
    for i, s in enumerate(sums):
        ax.hlines(s["goal_fp32"], i - 1.5 * width, i - 0.5 * width, colors="black", linestyles="dashed")
    ax.axhline(GOAL_BEST, color="grey", linestyle=":", label=f"best-mode goal {GOAL_BEST:g}x")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(names)), [LABELS[n].split(" (")[0] for n in names], fontsize=8)
    ax.set_ylabel("throughput / HF or ST fp32")
    ax.set_title(f"ArrowEngine vs HF / sentence-transformers, {r['cpu']['model_name']}, {r['cpu']['cores']} cores "
                 "(dashes: fp32 goal)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(path)]


def write(r: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"models-{r['machine']}"
    r["summary"] = [summarize(n, m) for n, m in r["models"].items()]
    r["charts"] = [Path(p).name for p in chart(r, out_dir / f"{stem}-ratios.png")]
    md = out_dir / f"{stem}.md"
    md.write_text(markdown(r))
    js = out_dir / f"{stem}.json"
    js.write_text(json.dumps(r, indent=2, default=float))
    return js, md
