"""ArrowEngine benchmarks: ``python -m bench`` compares ArrowEngine with HuggingFace (see bench/compare.py)."""
