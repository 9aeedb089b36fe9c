"""``python -m convert convert|inspect ...``."""
import sys

from convert.cli import main

sys.exit(main())
