"""What the core install (``pip install gsoft``: torch, transformers, peft, accelerate, safetensors) must be enough for."""

from __future__ import annotations

import subprocess
import sys

OPTIONAL = ("diffusers", "datasets", "einops", "triton", "sklearn", "scipy", "matplotlib")


def test_library_imports_without_the_optional_packages():
    """The tuner, the kernels' dispatch and gsoft.distributed import with every optional package hidden (as in a
    core-only install); only the recipes, the Triton backend and the tests need the extras."""
    hide = "; ".join(f"sys.modules[{name!r}] = None" for name in OPTIONAL)
    code = f"import sys; {hide}; import gsoft, gsoft.distributed, gsoft.plan, gsoft.tuner.fused; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
