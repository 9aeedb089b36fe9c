"""ArrowEngine benchmarks: ``python -m bench`` compares ArrowEngine with HuggingFace (see bench/compare.py).

Importing this package applies the engine's process-wide thread settings (``engine.set_thread_defaults``)
before torch loads, so every benchmark, and every worker process it starts, measures under the settings
``arrowengine serve`` runs with. Scripts run as files (``python bench/serving.py``) apply them themselves.
"""
from engine import set_thread_defaults

set_thread_defaults()
