"""python -m liteattn_ops.demo: see liteattn_ops/demo/cli.py (and --help)."""
import sys

from .cli import main

sys.exit(main())
