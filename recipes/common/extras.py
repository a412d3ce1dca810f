"""The extras of ``pyproject.toml`` that the scripts need, so a missing package is one line naming the extra to install.

Standard library only: it runs before the scripts import anything that an extra brings.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Iterator

#: Import names of the packages each extra installs (``pyproject.toml`` lists their distributions; a test compares).
EXTRAS: dict[str, tuple[str, ...]] = {
    "glue": ("accelerate", "datasets", "sklearn", "scipy", "yaml", "tqdm", "tokenizers"),
    "dreambooth": ("accelerate", "diffusers", "PIL", "yaml", "tqdm"),
}
#: [bench] is matplotlib plus both recipes' extras (the benchmarks run the recipes).
EXTRAS["bench"] = tuple(dict.fromkeys(("matplotlib", *EXTRAS["glue"], *EXTRAS["dreambooth"])))


def missing(extra: str) -> list[str]:
    """The packages of ``extra`` that cannot be imported here (found without importing them)."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; choose one of {', '.join(EXTRAS)}.")
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def _message(prog: str, extra: str, names: list[str]) -> str:
    return (f"{prog}: error: {', '.join(names)} {'is' if len(names) == 1 else 'are'} not installed; this script needs "
            f"gsoft's [{extra}] extra: pip install -e \".[{extra}]\" (from the repository root).")


@contextlib.contextmanager
def needs(extra: str, prog: str) -> Iterator[None]:
    """Wrap a script's imports: every package of ``extra`` must be importable (checked on entry, so packages the
    script imports later, inside functions, count too), else the script exits with one line naming the extra."""
    absent = missing(extra)
    if absent:
        raise SystemExit(_message(prog, extra, absent))
    try:
        yield
    except ModuleNotFoundError as exc:
        root = (exc.name or "").partition(".")[0]
        if root not in EXTRAS[extra]:
            raise
        raise SystemExit(_message(prog, extra, [root])) from None
