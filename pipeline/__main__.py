"""`python -m pipeline generate ...`: the same as the `sfo` console script (pipeline/cli.py)."""
import sys

from .cli import main

sys.exit(main())
