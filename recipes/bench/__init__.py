"""The benchmarks that ``recipes/benchmark.py NAME`` runs: one module per benchmark (``adapters``, ``kernels``,
``glue``, ``dreambooth``, ``comm``; each holds only what it measures), ``measure`` (how everything is measured and
reported) and ``options`` (one option style: a dataclass, configs/bench/NAME.yaml and ``--key value`` flags)."""
