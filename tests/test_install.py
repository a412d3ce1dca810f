"""What the core install (``pip install gsoft``: torch, transformers, peft, safetensors) and the ``[glue]`` extra (the
README's main job) must be enough for, and what the package ships."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("diffusers", "datasets", "einops", "triton", "sklearn", "scipy", "matplotlib")


def test_library_imports_without_the_optional_packages():
    """The tuner, the kernels' dispatch and gsoft.distributed import with every optional package hidden (as in a
    core-only install); only the recipes, the Triton backend and the tests need the extras."""
    hide = "; ".join(f"sys.modules[{name!r}] = None" for name in OPTIONAL)
    code = f"import sys; {hide}; import gsoft, gsoft.distributed, gsoft.plan, gsoft.tuner.fused; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_main_job_needs_only_the_glue_extra():
    """Set-up step 1 installs ``.[glue]``: the GLUE recipe imports (and parses its smoke config) with the packages
    that only the other extras bring hidden."""
    others = ("diffusers", "matplotlib", "PIL", "triton")
    hide = "; ".join(f"sys.modules[{name!r}] = None" for name in others)
    code = (f"import sys; {hide}; import roberta_glue; from common.args import parse_recipe_args; "
            "args = parse_recipe_args(roberta_glue.GlueArgs, ['--config', 'configs/glue/smoke.yaml']); print(args.method)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "recipes")})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("gsoft"), proc.stderr[-3000:]


@pytest.mark.parametrize("script,args,extra,hidden", [
    ("roberta_glue", ["--help"], "glue", "tokenizers"),
    ("dreambooth", ["--help"], "dreambooth", "PIL"),
    ("eval_subject", ["--help"], "dreambooth", "diffusers"),
    ("benchmark", ["adapters", "--help"], "bench", "matplotlib"),
])
def test_a_missing_package_is_one_line_naming_the_extra(script, args, extra, hidden):
    code = (f"import runpy, sys; sys.modules[{hidden!r}] = None; sys.argv = [{script!r}, *{args!r}]; "
            f"runpy.run_path('recipes/{script}.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "recipes")})
    assert proc.returncode == 1 and not proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"{script}: error: {hidden} is not installed; this script needs gsoft's [{extra}] "
                                   f'extra: pip install -e ".[{extra}]" (from the repository root).'), proc.stderr[-3000:]


def test_extras_table_matches_pyproject():
    """common.extras names, per extra, import names whose distributions pyproject.toml puts in that extra."""
    from common.extras import EXTRAS

    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def closure(extra: str) -> set[str]:
        dists = set()
        for spec in optional[extra]:
            name = re.split(r"[\s<>=!~;]", spec, maxsplit=1)[0]
            if name.startswith("gsoft["):
                for inner in name[len("gsoft["):-1].split(","):
                    dists |= closure(inner)
            else:
                dists.add(name.lower())
        return dists

    providers = importlib.metadata.packages_distributions()
    for extra, modules in EXTRAS.items():
        declared = closure(extra)
        for module in modules:
            assert {d.lower() for d in providers[module]} & declared, (extra, module, providers[module], declared)
        assert len(declared) == len({d for m in modules for d in providers[m] if d.lower() in declared}), \
            (extra, declared)


def test_pyproject_lists_every_package_and_nothing_else():
    """pyproject.toml lists the packages by hand (``gsoft.kernels`` comes from another directory, which discovery
    cannot map): every package directory of ``gsoft/`` is listed, ``gsoft.kernels`` maps to ``kernels/`` with its CUDA
    source, and nothing installs at the top level besides ``gsoft`` (no modules, no .pth files, no setup.py)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "gsoft").rglob("__init__.py")
    } | {"gsoft.kernels"}
    assert (ROOT / "kernels" / "__init__.py").is_file() and (ROOT / "kernels" / "gs_grouped.cu").is_file()
    assert set(setuptools["packages"]) == on_disk
    assert setuptools["package-dir"] == {"gsoft.kernels": "kernels"}
    assert setuptools["package-data"] == {"gsoft.kernels": ["*.cu"]}
    assert set(setuptools) == {"packages", "package-dir", "package-data"}
    assert not [p.name for p in ROOT.iterdir() if p.suffix == ".pth" or p.name in ("setup.py", "setup.cfg")]
