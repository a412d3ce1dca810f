#!/usr/bin/env python
"""Run one of the benchmarks in ``recipes/bench/`` side by side with PEFT's methods.

    python recipes/benchmark.py adapters --config configs/bench/adapters.yaml
    python recipes/benchmark.py kernels  --quick
    python recipes/benchmark.py glue     --config configs/bench/glue.yaml
    python recipes/benchmark.py dreambooth --quick
    python recipes/benchmark.py comm     --quick

``python recipes/benchmark.py NAME --help`` lists a benchmark's options; docs/benchmarks.md has the results.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional, Sequence

BENCHMARKS = ("adapters", "kernels", "glue", "dreambooth", "comm")


def main(argv: Optional[Sequence[str]] = None) -> object:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise SystemExit(f"benchmark: error: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}.")
    return importlib.import_module(f"bench.{name}").main(rest)


if __name__ == "__main__":
    main()
