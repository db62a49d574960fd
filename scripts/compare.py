"""Run dipddpm-compare from a source checkout: python scripts/compare.py PATH... [--out DIR]."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dipddpm.compare import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
