"""One option style for every benchmark: a documented dataclass filled by ``common.parse_recipe_args`` from
``configs/bench/<name>.yaml`` (or ``--config FILE``) and ``--key value`` flags, with two layers in between.

Precedence, lowest first: the YAML file < ``device_overrides[<cpu|cuda>]`` (benchmarks with a device) <
``quick_overrides`` (with ``--quick``) < the command line. The override layers go through the same parser as the
command line (as flags placed before the user's own), so their values are typed and checked the same way; a mapping
option whose field says ``merge`` is updated key by key (dotted flags), any other option is replaced.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from common.args import parse_recipe_args

from .measure import DeviceName, resolve_device

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs" / "bench"
#: Option layers that are not options themselves: they may not set each other.
LAYERS = ("quick_overrides", "device_overrides")

T = TypeVar("T", bound="BenchOptions")


@dataclass
class BenchOptions:
    """The options every benchmark has."""

    output_dir: str = field(
        default="outputs/bench",
        metadata={"help": "Where <name>.md (the tables), <name>.json (every number) and <name>.png (the plot) go."},
    )
    quick: bool = field(
        default=False, metadata={"help": "Apply quick_overrides: a smoke run of seconds to a minute on a CPU."}
    )
    quick_overrides: dict = field(
        default_factory=dict, metadata={"help": "The options --quick sets (the command line still wins)."}
    )
    plot: bool = field(default=True, metadata={"help": "Save <name>.png next to the tables."})
    argv: list = field(default_factory=list, init=False, metadata={"help": "The command line (for the report)."})


@dataclass
class TrainStepOptions(BenchOptions):
    """The options of a benchmark that times and profiles whole train steps side by side
    (:func:`bench.measure.train_step_rows` reads them), and its device."""

    warmup: int = field(default=1, metadata={"help": "Untimed steps per method first."})
    rounds: int = field(default=3, metadata={"help": "Interleaved timing rounds."})
    steps_per_round: int = field(default=2, metadata={"help": "Timed steps per method and round."})
    memory: bool = field(default=True, metadata={"help": "Measure peak memory (one extra step per method)."})
    threads: Optional[int] = field(default=None, metadata={"help": "torch threads on a CPU (null: torch's default)."})
    device: DeviceName = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda."})
    device_overrides: dict = field(default_factory=dict, metadata={"help": "Options per device type (cpu, cuda)."})
    seed: int = field(default=0, metadata={"help": "Seed of weights and inputs."})

    def __post_init__(self) -> None:
        resolve_device(self.device)  # --device cuda without a GPU fails here, naming the fix


def parse_options(cls: type[T], name: str, argv: Optional[Sequence[str]], description: Optional[str],
                  device_of: Optional[Callable[[T], str]] = None) -> T:
    """The options of benchmark ``name`` from ``argv`` (default ``sys.argv[1:]``); ``--config`` defaults to
    ``configs/bench/<name>.yaml``. ``device_of(options)`` names the device type whose ``device_overrides`` apply
    (None: the benchmark has none). ``--help`` prints every option and exits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config, rest = _split_config(argv, CONFIG_DIR / f"{name}.yaml")
    description = (f"{description or ''}\nOptions: `python recipes/benchmark.py {name} [--config FILE.yaml] [--key "
                   f"value ...]`, the config defaulting to configs/bench/{name}.yaml; the defaults listed below apply "
                   "to the options a config leaves out.")
    options = parse_recipe_args(cls, ["--config", config, *rest], description=description)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if device_of is not None:
        device = device_of(options)
        layers.append((f"device_overrides.{device}", options.device_overrides.get(device) or {}))
    if options.quick:
        layers.append(("quick_overrides", options.quick_overrides))
    flags = [flag for where, layer in layers for flag in _layer_flags(cls, layer, where, config)]
    if flags:
        options = parse_recipe_args(cls, ["--config", config, *flags, *rest], description=description)
    options.argv = argv
    return options


def _split_config(argv: list[str], default: Path) -> tuple[str, list[str]]:
    """``(config path, the other arguments)``: ``--config FILE`` or ``--config=FILE`` taken out of ``argv``."""
    config, rest, i = str(default), [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            config, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            config, i = argv[i].partition("=")[2], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return config, rest


def _layer_flags(cls: type, layer: Mapping[str, Any], where: str, config: str) -> list[str]:
    """``--key value`` flags that set ``layer``'s options (a ``merge`` mapping: one dotted flag per leaf)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    flags: list[str] = []
    for key, value in layer.items():
        if key not in fields or key in LAYERS or key == "quick":
            close = difflib.get_close_matches(str(key), [k for k in fields if k not in LAYERS], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SystemExit(f"benchmark: error: {where} in {config} sets {key!r}, which is not an option it may "
                             f"set{hint}")
        if fields[key].metadata.get("merge") and isinstance(value, Mapping):
            flags += option_flags(_leaves(key, value))
        else:
            flags += option_flags({key: value})
    return flags


def _leaves(prefix: str, mapping: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prefix.a.b": leaf}`` for every leaf of a nested mapping (an empty mapping is a leaf)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping) and value:
            out.update(_leaves(f"{prefix}.{key}", value))
        else:
            out[f"{prefix}.{key}"] = value
    return out


def option_flags(options: Mapping[str, Any]) -> list[str]:
    """``--key value`` flags that ``common.parse_recipe_args`` reads back as ``options`` (a benchmark's layers, a
    recipe's per-run options): strings as they are, other values as JSON (JSON is YAML)."""
    flags: list[str] = []
    for key, value in options.items():
        flags += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return flags


def repo_path(path: str) -> Path:
    """A file option's path: as given when it exists (absolute, or relative to the working directory), else relative
    to the repository root (so that the default configs work from any directory); a missing file names both."""
    given = Path(path)
    if given.is_file():
        return given
    if not given.is_absolute() and (REPO_ROOT / given).is_file():
        return REPO_ROOT / given
    raise ValueError(f"{path!r} not found (neither in {Path.cwd()} nor in {REPO_ROOT}).")
