"""Tells users to ``import gsoft`` when PEFT meets a GSOFT adapter before gsoft was imported.

Loaded at interpreter start by ``gsoft-peft-hint.pth`` (installed next to it). It imports nothing heavy: it only
watches for ``peft.mapping`` being imported and then makes a lookup of the ``"GSOFT"`` PEFT type fail with a message
that names the fix, instead of a bare ``KeyError: 'GSOFT'``. ``import gsoft`` fills the real entry, after which this
hook never fires.
"""

from __future__ import annotations

import importlib.abc
import sys

MESSAGE = (
    "This adapter was made with gsoft (peft_type 'GSOFT'), which PEFT does not know until gsoft is imported. "
    "Run `import gsoft` before loading it (pip install gsoft if it is missing)."
)


class _HintDict(dict):
    def __missing__(self, key):
        if str(getattr(key, "value", key)) == "GSOFT":
            raise KeyError(MESSAGE)
        raise KeyError(key)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for name in ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING"):
            table = getattr(module, name, None)
            if isinstance(table, dict) and not isinstance(table, _HintDict):
                setattr(module, name, _HintDict(table))


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "peft.mapping":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
