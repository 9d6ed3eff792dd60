"""Run the benchmarks of every system, or of the systems named on the command line.

Each ``benchmarks/<system>/bench_*.py`` has a ``main()`` that prints every goal beside the measured
figure and the ratio to the baseline measured in the same run, and writes
``results/<system>/*.json``.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent


def main(argv: list[str]) -> int:
    systems = argv or sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name[0] != "_")
    for system in systems:
        folder = ROOT / system
        if not folder.is_dir():
            print(
                f"error: no benchmarks for {system!r}; choose from "
                f"{', '.join(sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name[0] != '_'))}",
                file=sys.stderr,
            )
            return 2
        for path in sorted(folder.glob("bench_*.py")):
            print(f"== {system}/{path.stem}")
            start = time.perf_counter()
            importlib.import_module(f"benchmarks.{system}.{path.stem}").main()
            print(f"   ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
