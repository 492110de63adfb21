"""Run the SMD evaluation harness; see ``python scripts/smd_harness.py --help``."""

from __future__ import annotations

import sys

from fanomad_stream.evaluate.harness import main

if __name__ == "__main__":
    sys.exit(main())
