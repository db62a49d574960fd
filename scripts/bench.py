"""Run dipddpm-bench from a source checkout: python scripts/bench.py [--quick] [--out DIR] ..."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dipddpm.bench import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
