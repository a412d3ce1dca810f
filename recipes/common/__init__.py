"""Shared pieces of the training recipes (``recipes/*.py``): the run skeleton (``loop``), YAML + CLI options, method ->
PEFT config, output directories and results.json, checkpoints, metrics logging, communication between data-parallel
processes.

Recipes differ in data, models, loss and evaluation; everything a user expects to behave the same way across them
lives here, once: a recipe subclasses :class:`common.loop.Recipe` and runs through :func:`common.loop.run_recipe`.

The package itself imports nothing, so that :mod:`common.extras` can check a script's dependencies before they are
imported; scripts import from the modules (``from common.loop import run_recipe``).
"""
