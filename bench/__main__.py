"""``python -m bench``: ArrowEngine vs HuggingFace in one run (see bench/compare.py)."""
import sys

from bench.compare import main

sys.exit(main())
