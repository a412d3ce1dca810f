"""OLGA / EF-OLGA against GD, EF21, Qsparse-local-SGD and AEG: uplink bits per worker to a target accuracy.

    python recipes/benchmark.py olga           # configs/bench/olga.yaml: the problems, step search, sweep, ablation
    python recipes/benchmark.py olga --quick   # two small problems, theory steps only (seconds)

Problems (``problems`` in the config, each split over ``workers`` workers, worker 0 the server):

* ``digits``: scikit-learn's bundled ``load_digits`` (no download), even against odd digits, each feature scaled
  to [0, 1] by its range (as LibSVM's scaled data sets are), constant ones dropped, plus a constant feature, rows
  shuffled and dealt out evenly: similar data;
* ``breast_cancer``: ``load_breast_cancer`` prepared the same way;
* ``generated``: ``samples`` rows per worker of ``z * s + shift * u_m`` with ``z ~ N(0, I)``, feature scales
  ``s_j = 10^(-decay j / (dim - 1))`` and ``u_m`` a random unit vector per worker; labels drawn from
  ``sigmoid(z . w)`` (logistic) or ``z . w + noise`` (ridge). ``shift`` moves each worker's feature distribution
  apart, so ``delta`` grows with it.

For each problem the benchmark solves for ``f*`` with Newton's method (exact Hessians), takes ``mu`` (``l2`` for
logistic regression, the Hessian's smallest eigenvalue for ridge), ``L`` (global bounds from the data), and
``delta = max_m ||hess f_m - hess f||`` at ``x0 = 0`` and at ``x*`` (exact Hessians; exact for ridge), then runs
every method from ``x0 = 0`` until ``f(x) - f* <= target (f(x0) - f*)`` or ``max_rounds`` communication rounds,
for ``step_scales`` entries ``c`` in ascending order until one does worse than the best so far: GD, EF21 and
Qsparse-local at ``c`` times their theory step, AEG, OLGA and EF-OLGA with ``delta / c`` in their theory rule
(``c = 1``: the theory). Bits are the uplink bits of one worker (payloads as :mod:`gsoft.distributed.compressors`
count them, fp32 for uncompressed vectors); the server's broadcasts are the downlink column.

``sweep`` repeats the step search on one problem over numbers of workers and compression ratios; ``ablation``
runs OLGA and EF-OLGA with each of the module's deviations from the method's description undone in turn.

Writes ``olga.md`` (the tables, also printed), ``olga.json`` (every run, the curves thinned) and ``olga.png``
(``f - f*`` against bits, the best step of each method) into ``output_dir``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from gsoft.distributed.baselines import (
    EF21Config,
    GDConfig,
    QsparseConfig,
    aeg,
    ef21,
    ef21_theory_lr,
    gd,
    qsparse_local,
)
from gsoft.distributed.compressors import RandK, TopK
from gsoft.distributed.olga import History, LinearModelProblem, OLGAConfig, objective, olga, similarity, solve

from . import measure
from .options import BenchOptions, parse_options

Method = Literal["gd", "ef21", "qsparse", "aeg", "olga", "ef_olga"]
METHODS: tuple[str, ...] = ("gd", "ef21", "qsparse", "aeg", "olga", "ef_olga")
SOURCES = ("digits", "breast_cancer", "generated")
#: Every key a problem spec may have, with its default.
PROBLEM_DEFAULTS: dict[str, Any] = {"source": "generated", "loss": "logistic", "workers": 10, "l2": 1e-3, "seed": 0,
                                    "samples": 1000, "dim": 200, "decay": 1.5, "shift": 0.0, "noise": 0.5}
#: Curves in the JSON and the plot keep at most this many points each.
CURVE_POINTS = 300


@dataclass
class OLGAOptions(BenchOptions):
    """Options of the OLGA benchmark (defaults: configs/bench/olga.yaml)."""

    output_dir: str = field(default="outputs/bench_olga",
                            metadata={"help": "Where olga.md, olga.json and olga.png go."})
    problems: dict = field(
        default_factory=lambda: {"digits": {"source": "digits"}},
        metadata={"help": "name -> problem spec: source (digits | breast_cancer | generated), loss (logistic | "
                          "ridge), workers, l2, seed; generated: samples (per worker), dim, decay, shift, noise."},
    )
    methods: list[Method] = field(default_factory=lambda: list(METHODS),
                                  metadata={"help": f"Methods to run, in order (from {', '.join(METHODS)})."})
    ratio: float = field(default=0.05, metadata={"help": "Fraction of coordinates Top-K / Rand-K send."})
    local_steps: int = field(default=4, metadata={"help": "H, Qsparse-local-SGD's local steps per round."})
    step_scales: list[float] = field(
        default_factory=lambda: [0.25 * 2.0**i for i in range(13)],
        metadata={"help": "The step grid: c x the theory step (AEG / OLGA / EF-OLGA: delta / c); 1 = the theory. "
                          "Searched upwards until a step does worse than the best so far."},
    )
    target: float = field(default=1e-6, metadata={"help": "Stop at f(x) - f* <= target (f(x0) - f*)."})
    max_rounds: int = field(default=4000, metadata={"help": "Communication rounds per run at most."})
    sweep: dict = field(
        default_factory=dict,
        metadata={"help": "{problem: name, workers: [..], ratios: [..], methods: [..], max_rounds: N}: the step "
                          "search over numbers of workers and compression ratios; empty: none."},
    )
    ablation: dict = field(
        default_factory=dict,
        metadata={"help": "{problem: name, ratios: [..], max_rounds: N}: OLGA and EF-OLGA with each deviation from "
                          "the method's description undone in turn (theory parameters); empty: none."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds OLGA's loop coin and Rand-K's draws (a problem's data has "
                                                   "its own seed)."})
    threads: Optional[int] = field(default=1, metadata={"help": "torch.set_num_threads (null: torch's default)."})

    def __post_init__(self) -> None:
        if not self.problems:
            raise ValueError("--problems is empty; name at least one, e.g. {digits: {source: digits}}")
        self.problems = {name: problem_spec(name, spec) for name, spec in self.problems.items()}
        if not 0 < self.ratio <= 1:
            raise ValueError(f"--ratio must be in (0, 1] (the fraction of coordinates sent), got {self.ratio!r}")
        if self.local_steps < 1:
            raise ValueError(f"--local_steps must be >= 1, got {self.local_steps!r}")
        if not self.step_scales or any(not c > 0 for c in self.step_scales):
            raise ValueError(f"--step_scales must be positive numbers, got {self.step_scales!r}; [1] runs the "
                             "theory steps only")
        if not 0 < self.target < 1:
            raise ValueError(f"--target must be in (0, 1) (a fraction of f(x0) - f*), got {self.target!r}")
        if self.max_rounds < 1:
            raise ValueError(f"--max_rounds must be >= 1, got {self.max_rounds!r}")
        if self.sweep:
            unknown = set(self.sweep) - {"problem", "workers", "ratios", "methods", "max_rounds"}
            if unknown:
                raise ValueError(f"--sweep has unknown keys {sorted(unknown)}; it takes problem, workers, ratios, "
                                 "methods, max_rounds")
            if self.sweep.get("problem") not in self.problems:
                raise ValueError(f"--sweep's problem {self.sweep.get('problem')!r} is not one of --problems "
                                 f"({', '.join(self.problems)})")
            bad = [m for m in self.sweep.get("methods", []) if m not in METHODS]
            if bad:
                raise ValueError(f"--sweep's methods {bad} are not methods of this benchmark ({', '.join(METHODS)})")
        if self.ablation:
            unknown = set(self.ablation) - {"problem", "ratios", "max_rounds"}
            if unknown:
                raise ValueError(f"--ablation has unknown keys {sorted(unknown)}; it takes problem, ratios, max_rounds")
            if self.ablation.get("problem") not in self.problems:
                raise ValueError(f"--ablation's problem {self.ablation.get('problem')!r} is not one of --problems "
                                 f"({', '.join(self.problems)})")


def problem_spec(name: str, spec: dict) -> dict:
    """``spec`` with every default filled in; unknown keys and bad values are errors naming the problem."""
    unknown = set(spec) - set(PROBLEM_DEFAULTS)
    if unknown:
        raise ValueError(f"problem {name!r}: unknown keys {sorted(unknown)}; a problem takes "
                         f"{', '.join(PROBLEM_DEFAULTS)}")
    full = {**PROBLEM_DEFAULTS, **spec}
    if full["source"] not in SOURCES:
        raise ValueError(f"problem {name!r}: source must be one of {', '.join(SOURCES)}, got {full['source']!r}")
    if full["loss"] not in ("logistic", "ridge"):
        raise ValueError(f"problem {name!r}: loss must be logistic or ridge, got {full['loss']!r}")
    if full["loss"] == "ridge" and full["source"] != "generated":
        raise ValueError(f"problem {name!r}: {full['source']} is a classification set; ridge runs on source: generated")
    if not (isinstance(full["workers"], int) and full["workers"] >= 2):
        raise ValueError(f"problem {name!r}: workers must be an int >= 2 (the server and at least one worker), got "
                         f"{full['workers']!r}")
    for key in ("samples", "dim"):
        if isinstance(full[key], bool) or not isinstance(full[key], int) or full[key] < 1:
            raise ValueError(f"problem {name!r}: {key} must be an int >= 1, got {full[key]!r}")
    for key in ("l2", "decay", "shift", "noise"):
        if isinstance(full[key], bool) or not isinstance(full[key], (int, float)) or not full[key] >= 0 \
                or (key == "l2" and not full[key] > 0):
            raise ValueError(f"problem {name!r}: {key} must be a number {'> 0' if key == 'l2' else '>= 0'}, got "
                             f"{full[key]!r}")
    return full


# ----------------------------------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------------------------------
def bundled_data(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A scikit-learn bundled data set as ``(features in [0, 1] plus a constant 1, labels in {-1, +1})``."""
    from sklearn.datasets import load_breast_cancer, load_digits

    data = load_digits() if source == "digits" else load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target)
    labels = torch.where(y % 2 == 0, 1.0, -1.0) if source == "digits" else torch.where(y == 1, 1.0, -1.0)
    x = x[:, x.amax(dim=0) > x.amin(dim=0)]  # constant pixels carry nothing
    x = (x - x.amin(dim=0)) / (x.amax(dim=0) - x.amin(dim=0))
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1), labels.to(torch.float64)


def build_problem(spec: dict) -> LinearModelProblem:
    """The :class:`LinearModelProblem` of a (filled-in) problem spec."""
    gen = torch.Generator().manual_seed(int(spec["seed"]))
    workers = spec["workers"]
    if spec["source"] != "generated":
        x, y = bundled_data(spec["source"])
        parts = torch.randperm(x.shape[0], generator=gen).tensor_split(workers)
        return LinearModelProblem([x[p] for p in parts], [y[p] for p in parts], "logistic", spec["l2"])
    dim, n = spec["dim"], spec["samples"]
    scales = 10.0 ** (-spec["decay"] * torch.arange(dim, dtype=torch.float64) / max(1, dim - 1))
    w_true = torch.randn(dim, generator=gen, dtype=torch.float64) * 3 / math.sqrt(dim)
    features, targets = [], []
    for _ in range(workers):
        u = torch.randn(dim, generator=gen, dtype=torch.float64)
        z = torch.randn(n, dim, generator=gen, dtype=torch.float64)
        features.append(z * scales + spec["shift"] * u / u.norm())
        score = z @ w_true
        if spec["loss"] == "logistic":
            draw = torch.rand(n, generator=gen, dtype=torch.float64)
            targets.append(torch.where(draw < torch.sigmoid(score), 1.0, -1.0))
        else:
            targets.append(score + spec["noise"] * torch.randn(n, generator=gen, dtype=torch.float64))
    return LinearModelProblem(features, targets, spec["loss"], spec["l2"])


def constants(problem: LinearModelProblem) -> dict[str, Any]:
    """``x*``, ``f*``, ``f(x0)`` and the constants the theory steps use (see the module docstring)."""
    x0 = torch.zeros(problem.dim, dtype=torch.float64)
    x_star, f_star = solve(problem)
    per_worker = [problem.smoothness(m) for m in range(problem.n_workers)]
    return {"x_star": x_star, "f_star": f_star, "f0": objective(problem, x0), "L": problem.smoothness(),
            "L_max": max(per_worker), "L_tilde": math.sqrt(sum(v * v for v in per_worker) / len(per_worker)),
            "mu": problem.strong_convexity(), "delta": similarity(problem, [x0, x_star])}


# ----------------------------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------------------------
def label(method: str, ratio: float, local_steps: int) -> str:
    pct = f"{100 * ratio:g}%"
    return {"gd": "GD (fp32)", "ef21": f"EF21 (Top-K {pct})", "aeg": "AEG (fp32)",
            "qsparse": f"Qsparse-local (Top-K {pct}, H={local_steps})", "olga": f"OLGA (Rand-K {pct})",
            "ef_olga": f"EF-OLGA (Top-K {pct})"}[method]


def runner(method: str, problem: LinearModelProblem, c: dict[str, Any], scale: float, ratio: float,
           local_steps: int, seed: int, variant: Optional[dict] = None) -> Callable[..., History]:
    """The run of ``method`` at step scale ``scale``, as a function of the stopping keywords; ``variant``: more
    :class:`OLGAConfig` fields (OLGA and EF-OLGA only)."""
    if variant and method not in ("olga", "ef_olga"):
        raise ValueError(f"variant {variant} holds OLGAConfig fields; {method} has none")
    if method == "gd":
        return lambda **kw: gd(problem, GDConfig(scale / c["L"]), **kw)
    if method == "ef21":
        lr = scale * ef21_theory_lr(c["L"], c["L_tilde"], ratio)
        return lambda **kw: ef21(problem, EF21Config(lr, TopK(ratio), seed), **kw)
    if method == "qsparse":
        return lambda **kw: qsparse_local(problem, QsparseConfig(scale / c["L_max"], local_steps, TopK(ratio), seed),
                                          **kw)
    base = {"mu": c["mu"], "delta": c["delta"] / scale, "smoothness": c["L_max"], "seed": seed}
    if method == "aeg":
        return lambda **kw: aeg(problem, OLGAConfig(**base), **kw)
    compressor = RandK(ratio, rescale=True) if method == "olga" else TopK(ratio)
    return lambda **kw: olga(problem, OLGAConfig(**base, compressor=compressor, **(variant or {})), **kw)


def thin(history: History, span: float, points: int = CURVE_POINTS) -> dict[str, list]:
    """The curve (rounds, bits, ``gap / span``) at most ``points`` records long (log-spaced indices, the last
    kept)."""
    n = len(history.gap)
    keep = sorted({min(n - 1, int(round(math.expm1(math.log1p(n - 1) * i / (points - 1))))) for i in range(points)})
    return {"rounds": [history.rounds[i] for i in keep], "bits": [history.bits[i] for i in keep],
            "gap": [history.gap[i] / span for i in keep]}


def run_one(method: str, problem: LinearModelProblem, c: dict[str, Any], scale: float, options: OLGAOptions,
            ratio: float, max_rounds: int, variant: Optional[dict] = None) -> dict[str, Any]:
    """One run's summary: rounds, uplink and downlink bits at the target (or at the end, when not reached)."""
    start = time.perf_counter()
    run = runner(method, problem, c, scale, ratio, options.local_steps, options.seed, variant)
    span = c["f0"] - c["f_star"]
    history = run(max_rounds=max_rounds, f_star=c["f_star"], target=options.target * span)
    hit = history.first_reaching(options.target * span)
    at = len(history.gap) - 1 if hit is None else hit
    return {"method": method, "label": label(method, ratio, options.local_steps), "scale": scale,
            "reached": hit is not None, "rounds": history.rounds[at], "bits": history.bits[at],
            "downlink_bits": history.downlink_bits[at], "final_gap": history.gap[-1] / span,
            "diverged": bool(history.info.get("diverged")), "seconds": time.perf_counter() - start,
            "info": {k: v for k, v in history.info.items() if k != "diverged"},
            "curve": thin(history, span)}


def search_steps(method: str, problem: LinearModelProblem, c: dict[str, Any], options: OLGAOptions, ratio: float,
                 max_rounds: int) -> list[dict[str, Any]]:
    """``method``'s runs over ``step_scales`` in ascending order, stopping at the first scale that does worse than
    the best run so far once one has reached the target (more bits, or the target missed): the same search for
    every method."""
    runs: list[dict[str, Any]] = []
    for scale in sorted(options.step_scales):
        result = run_one(method, problem, c, scale, options, ratio, max_rounds)
        print(f"  {result['label']} x{scale:g}: {'reached' if result['reached'] else 'NOT reached'} in "
              f"{result['rounds']} rounds, {fmt_bits(result['bits'])} ({result['seconds']:.1f} s)", flush=True)
        leader = [r for r in runs if r["reached"]]
        runs.append(result)
        if leader and (not result["reached"] or result["bits"] > min(r["bits"] for r in leader)):
            break
    return runs


def best(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run that reached the target with the fewest bits; when none did, the one that ended lowest."""
    reached = [r for r in runs if r["reached"]]
    if reached:
        return min(reached, key=lambda r: r["bits"])
    return min(runs, key=lambda r: r["final_gap"] if math.isfinite(r["final_gap"]) else math.inf)


def run_problem(name: str, spec: dict, options: OLGAOptions) -> dict[str, Any]:
    problem = build_problem(spec)
    c = constants(problem)
    print(f"{name}: d={problem.dim}, M={problem.n_workers}, L={c['L']:.3g} (max L_m {c['L_max']:.3g}), "
          f"mu={c['mu']:.3g}, delta={c['delta']:.3g}", flush=True)
    runs = []
    for method in options.methods:
        runs += search_steps(method, problem, c, options, options.ratio, options.max_rounds)
    summary = {}
    for method in options.methods:
        mine = [r for r in runs if r["method"] == method]
        top = best(mine)
        summary[method] = {"theory": next((r for r in mine if r["scale"] == 1.0), None), "best": top,
                           "tried": [r["scale"] for r in mine],
                           "edge": top["reached"] and len(options.step_scales) > 1
                           and top["scale"] in (min(options.step_scales), max(options.step_scales))}
    return {"name": name, "spec": spec, "dim": problem.dim, "workers": problem.n_workers,
            "samples": sum(a.shape[0] for a in problem.features),
            "constants": {k: v for k, v in c.items() if k != "x_star"}, "runs": runs, "summary": summary}


def run_sweep(options: OLGAOptions) -> list[dict[str, Any]]:
    """The sweep's problem for every number of workers and compression ratio: each method's step search, its best
    run kept."""
    sweep = options.sweep
    methods = sweep.get("methods") or ["ef21", "olga", "ef_olga"]
    rows = []
    for workers in sweep.get("workers", [options.problems[sweep["problem"]]["workers"]]):
        spec = {**options.problems[sweep["problem"]], "workers": workers}
        problem = build_problem(spec)
        c = constants(problem)
        for ratio in sweep.get("ratios", [options.ratio]):
            row = {"workers": workers, "ratio": ratio, "delta": c["delta"], "runs": {}}
            for method in methods:
                result = best(search_steps(method, problem, c, options, ratio,
                                           sweep.get("max_rounds", options.max_rounds)))
                result.pop("curve")
                row["runs"][method] = result
            print(f"  sweep M={workers} ratio={ratio:g}: " + ", ".join(
                f"{m} {fmt_reach(r)}" for m, r in row["runs"].items()), flush=True)
            rows.append(row)
    return rows


#: The ablation's rows: (method, label, OLGAConfig fields); the first of each method is the definition as implemented.
ABLATION: tuple[tuple[str, str, dict], ...] = (
    ("olga", "OLGA, as defined", {}),
    ("olga", "OLGA, delta not raised by the variance (omega = 0)", {"omega": 0.0}),
    ("olga", "OLGA, Q(Delta_m) (relative = False)", {"relative": False}),
    ("olga", "OLGA, Q(Delta_m), delta not raised (the description's literal rule)", {"relative": False, "omega": 0.0}),
    ("ef_olga", "EF-OLGA, as defined", {}),
    ("ef_olga", "EF-OLGA, errors sent at loop ends (error_flush = send)", {"error_flush": "send"}),
    ("ef_olga", "EF-OLGA, C(Delta_m) (relative = False)", {"relative": False}),
)


def run_ablation(options: OLGAOptions) -> dict[str, Any]:
    """Theory-parameter runs of OLGA and EF-OLGA with each of the module's deviations from the method's description
    undone in turn (:data:`ABLATION`), per compression ratio."""
    ablation = options.ablation
    problem = build_problem(options.problems[ablation["problem"]])
    c = constants(problem)
    rows = []
    for method, name, variant in ABLATION:
        row = {"method": method, "name": name, "variant": variant, "runs": {}}
        for ratio in ablation.get("ratios", [options.ratio]):
            result = run_one(method, problem, c, 1.0, options, ratio, ablation.get("max_rounds", options.max_rounds),
                             variant)
            result.pop("curve")
            row["runs"][f"{ratio:g}"] = result
        print(f"  ablation {name}: " + ", ".join(f"{r} {fmt_reach(v)}" for r, v in row["runs"].items()), flush=True)
        rows.append(row)
    return {"problem": ablation["problem"], "rows": rows}


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def fmt_bits(bits: Optional[float]) -> str:
    """Decimal units (Mbit, kbit, bit)."""
    if bits is None:
        return "-"
    for unit, scale in (("Mbit", 1e6), ("kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:.3g} {unit}"
    return f"{bits:.0f} bit"


def fmt_reach(run: dict[str, Any]) -> str:
    """Bits to the target, or ``> bits`` (not reached: the bits spent, a lower bound) with the gap at the end."""
    if run["reached"]:
        return fmt_bits(run["bits"])
    end = "diverged" if run["diverged"] else f"gap {run['final_gap']:.1e}"
    return f"> {fmt_bits(run['bits'])} ({end})"


def vs(run: dict[str, Any], reference: Optional[dict[str, Any]]) -> str:
    """``run``'s bits over ``reference``'s; ``<`` when only ``reference`` missed the target (a bound)."""
    if reference is None:
        return "-"
    if run["reached"] and reference["reached"]:
        return measure.fmt_ratio(run["bits"] / reference["bits"])
    if run["reached"]:
        return f"< {measure.fmt_ratio(run['bits'] / reference['bits'])}"
    return "-"


def problem_table(result: dict[str, Any], options: OLGAOptions) -> str:
    c, spec = result["constants"], result["spec"]
    shift = f", shift {spec['shift']:g}" if spec["source"] == "generated" else ""
    what = (f"{spec['source']} ({spec['loss']}{shift}), {result['samples']} rows over M = {result['workers']} "
            f"workers, d = {result['dim']}, l2 = {spec['l2']:g}: L = {c['L']:.3g} (max L_m {c['L_max']:.3g}), "
            f"mu = {c['mu']:.3g}, delta = {c['delta']:.3g} (delta / L = {c['delta'] / c['L']:.2f})")
    text = f"#### {result['name']}\n\n{what}. Target f - f* <= {options.target:g} (f(x0) - f*).\n\n"
    header = ["method", "theory: rounds", "bits / worker", "x GD", "c tried", "best c", "rounds", "bits / worker",
              "x GD", "downlink"]
    gd_theory = (result["summary"].get("gd") or {}).get("theory")
    gd_best = (result["summary"].get("gd") or {}).get("best")
    rows = []
    for method, s in result["summary"].items():
        t, b = s["theory"], s["best"]
        rows.append([b["label"],
                     "-" if t is None else (t["rounds"] if t["reached"] else f"> {t['rounds']}"),
                     "-" if t is None else fmt_reach(t), "-" if t is None else vs(t, gd_theory),
                     ", ".join(f"{x:g}" for x in s["tried"]), f"{b['scale']:g}" + (" (edge)" if s["edge"] else ""),
                     b["rounds"] if b["reached"] else f"> {b['rounds']}", fmt_reach(b),
                     vs(b, gd_best), fmt_bits(b["downlink_bits"])])
    return text + measure.markdown_table(header, rows)


def sweep_table(rows: list[dict[str, Any]], options: OLGAOptions) -> str:
    methods = list(rows[0]["runs"]) if rows else []
    text = (f"#### Sweep: {options.sweep['problem']} over workers and compression ratios\n\n"
            "Uplink bits per worker to the target at each method's best step of the same search (its c in "
            "brackets).\n\n")
    header = ["M", "ratio", "delta", *[label(m, options.ratio, options.local_steps).split(" (")[0] for m in methods]]
    cells = [[r["workers"], f"{r['ratio']:g}", f"{r['delta']:.3g}",
              *[f"{fmt_reach(r['runs'][m])} (c={r['runs'][m]['scale']:g})" for m in methods]] for r in rows]
    return text + measure.markdown_table(header, cells)


def ablation_table(ablation: dict[str, Any]) -> str:
    rows = ablation["rows"]
    ratios = list(rows[0]["runs"]) if rows else []
    text = (f"#### Ablation: {ablation['problem']}, each deviation from the description undone (theory "
            "parameters)\n\nUplink bits per worker to the target, per compression ratio (Rand-K for OLGA, Top-K for "
            "EF-OLGA).\n\n")
    return text + measure.markdown_table(["variant", *[f"ratio {r}" for r in ratios]],
                                         [[r["name"], *[fmt_reach(r["runs"][q]) for q in ratios]] for r in rows])


def claim(results: list[dict[str, Any]]) -> str:
    """Whether EF-OLGA reaches the target with fewer bits than EF21 and Qsparse-local, per problem (best steps)."""
    lines = []
    for result in results:
        s = result["summary"]
        if not {"ef_olga", "ef21", "qsparse"} <= set(s):
            continue
        mine = s["ef_olga"]["best"]
        others = [s["ef21"]["best"], s["qsparse"]["best"]]
        holds = mine["reached"] and all(mine["bits"] < o["bits"] for o in others)
        lines.append(f"- {result['name']}: EF-OLGA {fmt_reach(mine)} against EF21 {fmt_reach(others[0])} and "
                     f"Qsparse-local {fmt_reach(others[1])}: {'holds' if holds else 'DOES NOT HOLD'}.")
    return ("\nEF-OLGA needs fewer uplink bits than EF21 and Qsparse-local (best step of each):\n" + "\n".join(lines)
            + "\n") if lines else ""


def markdown(report: dict[str, Any], options: OLGAOptions) -> str:
    grid = ", ".join(f"{c:g}" for c in options.step_scales)
    text = (f"### OLGA benchmark: uplink bits per worker to f - f* <= {options.target:g} (f(x0) - f*)\n\n"
            f"Compression ratio {options.ratio:g}; step grid c in {{{grid}}} for every method (GD, EF21, Qsparse: "
            "c x the theory step; AEG, OLGA, EF-OLGA: delta / c in the theory rule), searched upwards until a step "
            "does worse than the best so far (`c tried`; `(edge)`: the best is at an end of the grid). `x GD`: bits "
            "over GD's at the same setting (theory, or each one's best); `> bits`: not reached within "
            f"{options.max_rounds} rounds (the bits spent, a lower bound). Downlink: the server's broadcasts at "
            "the best run's stop.\n\n")
    text += "\n".join(problem_table(r, options) for r in report["problems"])
    text += claim(report["problems"])
    if report.get("sweep"):
        text += "\n" + sweep_table(report["sweep"], options)
    if report.get("ablation"):
        text += "\n" + ablation_table(report["ablation"])
    return text


def plot(report: dict[str, Any]) -> Any:
    """``(f - f*) / (f(x0) - f*)`` against uplink bits per worker, the best step of each method, one panel per
    problem (log-log)."""
    problems = report["problems"]
    cols = min(2, len(problems))
    rows = math.ceil(len(problems) / cols)
    fig, axes = measure.subplots(rows, cols, 5.2 * cols, 4.0 * rows)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(problems):]:
        ax.set_visible(False)
    for ax, result in zip(flat, problems):
        for method, s in result["summary"].items():
            curve = s["best"]["curve"]
            points = [(b, g) for b, g in zip(curve["bits"], curve["gap"]) if b > 0 and g > 0 and math.isfinite(g)]
            if points:
                ax.plot(*zip(*points), label=f"{s['best']['label']} c={s['best']['scale']:g}", lw=1.4)
        ax.axhline(report["target"], color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(report["target"] / 30, 3)
        ax.set_xlabel("uplink bits per worker")
        ax.set_ylabel("(f - f*) / (f(x0) - f*)")
        ax.set_title(result["name"], fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=6)
    return fig


def parse(argv: Optional[Sequence[str]] = None) -> OLGAOptions:
    """The options: configs/bench/olga.yaml < quick_overrides < the command line."""
    return parse_options(OLGAOptions, "olga", argv, __doc__)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the report that is also written to ``olga.json``."""
    options = parse(argv)
    with measure.cpu_threads(torch.device("cpu"), options.threads):
        results = [run_problem(name, spec, options) for name, spec in options.problems.items()]
        sweep = run_sweep(options) if options.sweep else []
        ablation = run_ablation(options) if options.ablation else {}
    report = {**measure.report_header("olga", options, "sklearn"), "target": options.target, "problems": results,
              "sweep": sweep, "ablation": ablation}
    table = markdown(report, options)
    print("\n" + table)
    measure.write_outputs(options.output_dir, "olga", table, report, plot(report) if options.plot else None)
    return report
