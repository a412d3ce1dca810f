#!/usr/bin/env python
"""Run one of the benchmarks of ``recipes/bench/``: the methods side by side, tables printed, ratios, a plot.

    python recipes/benchmark.py NAME [--config configs/bench/NAME.yaml] [--key value ...] [--quick] [--output_dir DIR]

    adapters    speed, memory and cost proxies of GSOFT / Double GSOFT vs LoRA, OFT, BOFT on RoBERTa-sized encoders
    kernels     the GS multiply per backend vs a dense GEMM and PEFT's OFT / BOFT multiplies (--sweep: Triton tiles)
    glue        every method of recipes/roberta_glue.py on one GLUE task, one table
    dreambooth  a DreamBooth UNet train step per method (time, peak memory)
    quantized   QGSOFT vs QLoRA and OFT on the same 4-bit decoder base (time, peak memory, equal LoRA budget)
    comm        2 data-parallel workers on an emulated slow link, compressed gradients vs fp32 all-reduce
    olga        OLGA / EF-OLGA vs GD, EF21, Qsparse-local-SGD, AEG: uplink bits to a target accuracy (in process)

Options come from ``configs/bench/NAME.yaml`` (or ``--config``), then ``--key value`` flags; ``--quick`` applies the
config's ``quick_overrides`` (a smoke run). ``python recipes/benchmark.py NAME --help`` lists a benchmark's options.
Each writes ``NAME.md`` (the tables), ``NAME.json`` (every number) and ``NAME.png`` into ``--output_dir``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Optional, Sequence

from common.extras import needs

BENCHMARKS = ("adapters", "kernels", "glue", "dreambooth", "quantized", "comm", "olga")


def main(argv: Optional[Sequence[str]] = None) -> Any:
    """Run benchmark ``argv[0]`` with the other arguments; returns its report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return None
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise SystemExit(f"benchmark: error: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}.")
    with needs("bench", "benchmark"):
        module = importlib.import_module(f"bench.{name}")
    return module.main(rest)


if __name__ == "__main__":
    main()
