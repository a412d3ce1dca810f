#!/usr/bin/env python
"""Speed of the GS multiply ``y = Q x`` per backend, against a dense GEMM and PEFT's OFT / BOFT multiplies.

Usage::

    python recipes/bench_kernels.py                  # defaults from configs/bench/kernels.yaml (GPU: the full grid)
    python recipes/bench_kernels.py --quick          # smoke test, a few seconds on a CPU
    python recipes/bench_kernels.py --hidden 4096 --tokens 16384 --dtypes bf16 --methods torch,triton
    python recipes/bench_kernels.py --sweep          # GPU: time every Triton tile config at a few shapes (< 1 min)

For every hidden size ``n``, token count ``T`` (rows of ``x``), activation dtype and mode (``fwd``: ``y = Q x``;
``fwd+bwd``: also the backward to ``x`` and to the parameters) it times each method (median of ``reps`` after
``warmup``; ``torch.cuda.synchronize`` around every call on a GPU) and reports

* **ms** and **× torch** (time / the ``reference`` row's time, lower is better);
* **GB/s**: the activation traffic an ideal fused kernel needs (``fwd``: read x, write y = ``2 T n`` elements;
  ``fwd+bwd``: plus read dy and x, write dx = ``5 T n``), divided by the time; and **% BW**: that against the memory
  bandwidth, the GPU's spec-sheet HBM bandwidth where the device is known (else, and on a CPU, a measured large copy).

Methods (see the config for the parameter counts): ``torch`` (gsoft's reference path), ``triton`` and ``cuda``
(gsoft's fused kernels; "needs GPU" rows on a CPU), ``dense`` (``x @ Q^T`` with ``Q`` materialised once),
``peft_oft`` (PEFT's ``OFTRotationModule`` forward) and ``peft_boft`` (PEFT BOFT's per-call rotation: dense
block-diagonal matrices, permutation bmm, product, ``x @ R``; its block-diagonal step uses the pure-PyTorch stand-in
of ``recipes/bench_adapters.py`` because PEFT's ``fbd_cuda`` extension is broken). Every row starts from given
orthogonal blocks: the Cayley transform is excluded everywhere.

Outputs in ``--output_dir``: ``results.json``, ``tables.md`` and ``bench_kernels_<device>.png``.

``--sweep`` (config ``sweep.enabled``) runs the tile sweep instead: for each shape of ``sweep.shapes`` (rows x hidden x
block size ``c``, one block-diagonal pass with ``hidden / c`` blocks, as the two-factor GSOFT plan runs it) and dtype,
it times the multiply and the block-gradient kernels with every config of their tile spaces
(``gsoft.kernels.triton_gs.MULTIPLY_TILES`` / ``GRAD_TILES``, normalised per block size) and the heuristic's pick
(``triton.testing.do_bench``, median; the weights in the dtype ``block_multiply`` would pass, plus the heuristic's
pick with the other one), plus the public launchers (heuristic, dispatch and weight cast included) and a torch
einsum of the same multiply. It prints one table (ms, GB/s of the ideal traffic: read x and write y, or read
dy and x; % of ``sweep.peak_gbps``), marking the heuristic's pick (``H``) and the fastest config (``*``), and writes
``sweep.json``. It needs a CUDA GPU; on a CPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "bench" / "kernels.yaml"

import torch
import yaml

from bench import adapters as bench_adapters
from .adapters import boft_fbd, device_label, summary, sync, versions

LIST_KEYS = ("hidden", "tokens", "dtypes", "modes", "methods")
CLI_KEYS = (*LIST_KEYS, "warmup", "reps", "device", "threads", "plot", "seed", "output_dir")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
NAMES = {
    "torch": "gsoft torch path",
    "triton": "gsoft Triton",
    "cuda": "gsoft CUDA ext.",
    "dense": "dense x @ Q^T",
    "peft_oft": "PEFT OFT block multiply",
    "peft_boft": "PEFT BOFT butterfly",
}
#: Spec-sheet memory bandwidth (GB/s) by device-name fragment, most specific first.
HBM_GBPS = {"H200": 4800, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039, "A100": 1555, "L40S": 864}
#: Activation traffic of an ideal fused kernel, in multiples of T * n elements.
TRAFFIC = {"fwd": 2, "fwd+bwd": 5}


# ======================================================================================================================
# Settings
# ======================================================================================================================
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML settings (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="apply the config's `quick` section (smoke test)")
    for key in LIST_KEYS:
        p.add_argument(f"--{key}", help="comma-separated list")
    p.add_argument("--warmup", type=int)
    p.add_argument("--reps", type=int)
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, help="torch.set_num_threads on the CPU")
    p.add_argument("--plot", type=lambda s: s.lower() in ("1", "true", "yes"), help="save the PNG plot (true/false)")
    p.add_argument("--seed", type=int)
    p.add_argument("--output_dir")
    p.add_argument("--sweep", action="store_true", help="time every Triton tile config instead (config `sweep`; GPU)")
    return p.parse_args(argv)


def load_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = yaml.safe_load(Path(args.config).read_text())
    device = args.device or settings.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False.")
    settings.update((settings.get("device_overrides") or {}).get(device) or {})
    if args.quick:
        settings.update(settings.get("quick") or {})
    for key in CLI_KEYS:
        value = getattr(args, key, None)
        if value is None:
            continue
        if key in LIST_KEYS:
            value = [int(v) if key in ("hidden", "tokens") else v.strip() for v in value.split(",") if v.strip()]
        settings[key] = value
    settings["device"] = device
    settings["quick_mode"] = bool(args.quick)
    settings["sweep"] = dict(settings.get("sweep") or {})
    if args.sweep:
        settings["sweep"]["enabled"] = True
    unknown = [d for d in settings["dtypes"] if d not in DTYPES] + [m for m in settings["methods"] if m not in NAMES]
    if unknown:
        raise SystemExit(f"Unknown dtype(s)/method(s) {unknown}; dtypes: {sorted(DTYPES)}, methods: {sorted(NAMES)}.")
    return settings


# ======================================================================================================================
# Methods: each returns fn(x) -> y and the parameters whose gradients the backward computes
# ======================================================================================================================
def gs_blocks(n: int, settings: dict[str, Any], device: torch.device) -> torch.Tensor:
    from gsoft import gs

    b, m = settings["gs"]["block_size"], settings["gs"].get("n_factors", 2)
    skew = 0.1 * torch.randn(m, n // b, gs.n_skew_params(b))
    return gs.orthogonal_blocks(skew, b).to(device)


def make_method(
    name: str, n: int, dtype: torch.dtype, settings: dict[str, Any], device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    import gsoft
    from gsoft import gs

    if name in ("torch", "triton", "cuda"):
        blocks = gs_blocks(n, settings, device).requires_grad_()
        if name == "torch":  # the reference path needs one dtype; the fused kernels read fp32 blocks directly
            return (lambda x: gsoft.gs_apply(x, blocks.to(x.dtype), backend="torch")), [blocks]
        return (lambda x: gsoft.gs_apply(x, blocks, backend=name)), [blocks]
    if name == "dense":
        q = gs.materialize(gs_blocks(n, settings, device)).to(dtype).requires_grad_()
        return (lambda x: x @ q.T), [q]
    if name == "peft_oft":
        from peft.tuners.oft.layer import OFTRotationModule

        b = settings["oft"]["block_size"]
        module = OFTRotationModule(n // b, b * (b - 1) // 2, b, n, use_cayley_neumann=False).to(device)
        blocks = gs.orthogonal_blocks(0.1 * torch.randn(n // b, b * (b - 1) // 2, device=device), b)
        blocks.requires_grad_()
        module._cayley_batch = lambda *args, **kwargs: blocks  # PEFT's forward, minus the Cayley transform
        return module, [blocks]
    if name == "peft_boft":
        return make_boft(n, settings, device)
    raise ValueError(name)


def make_boft(n: int, settings: dict[str, Any], device: torch.device):
    """PEFT BOFT's rotation exactly as ``peft.tuners.boft.layer.Linear.forward`` builds and applies it."""
    from peft import BOFTConfig, get_peft_model
    from peft.tuners.boft.layer import FastBlockDiag

    from gsoft import gs

    b, m = settings["boft"]["block_size"], settings["boft"]["n_butterfly_factor"]
    holder = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False))
    with boft_fbd("torch"):
        model = get_peft_model(holder, BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m, target_modules=["0"]))
    layer = model.base_model.model[0]
    boft_p = layer.boft_P.to(device)
    shape = layer.boft_R["default"].shape  # (m, n / b, b, b)
    blocks = gs.orthogonal_blocks(0.1 * torch.randn(*shape[:2], gs.n_skew_params(b)), b).to(device).requires_grad_()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        block_diagonal = FastBlockDiag.apply(blocks).to(x)  # bench_adapters' stand-in builds the (m, n, n) matrices
        batch = torch.bmm(boft_p.to(x), torch.bmm(block_diagonal, boft_p.to(x).permute(0, 2, 1)))
        rotation = batch[0]
        for i in range(1, batch.shape[0]):
            rotation = batch[i] @ rotation
        return x @ rotation

    return rotate, [blocks]


def unavailable(name: str, device: torch.device, settings: dict[str, Any], n: int) -> Optional[str]:
    """Why a method cannot run here ("needs GPU", ...), or None."""
    if name in ("triton", "cuda") and device.type != "cuda":
        return "needs GPU"
    if name in ("triton", "cuda"):
        from gsoft.kernels.availability import unavailable_reason

        reason = unavailable_reason(name, torch.empty(1, n, device=device), gs_blocks(n, settings, device))
        return reason[:80] if reason else None
    return None


# ======================================================================================================================
# Measurements
# ======================================================================================================================
def time_method(fn, params, x: torch.Tensor, mode: str, warmup: int, reps: int, device: torch.device) -> list[float]:
    grad = torch.randn_like(x)

    def step() -> None:
        if mode == "fwd":
            with torch.no_grad():
                fn(x)
            return
        for p in params:
            p.grad = None
        x.grad = None
        fn(x).backward(grad)

    for _ in range(warmup):
        step()
    samples = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return samples


def memory_bandwidth(device: torch.device) -> tuple[float, str]:
    """GB/s to compare against: the spec sheet for known GPUs, else a measured copy of 256 MiB (read + write)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, gbps in HBM_GBPS.items():
            if fragment in name:
                return float(gbps), f"{name} spec-sheet HBM bandwidth"
    src = torch.empty(2**26, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    samples = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        samples.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / min(samples) / 1e9, "measured copy bandwidth (read + write)"


def run(settings: dict[str, Any]) -> dict[str, Any]:
    device = torch.device(settings["device"])
    if device.type == "cpu" and settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    bandwidth, bandwidth_source = memory_bandwidth(device)
    rows = []
    for n in settings["hidden"]:
        for tokens in settings["tokens"]:
            for dtype_name in settings["dtypes"]:
                dtype = DTYPES[dtype_name]
                for mode in settings["modes"]:
                    for name in settings["methods"]:
                        row = {"hidden": n, "tokens": tokens, "dtype": dtype_name, "mode": mode, "method": name}
                        row["skipped"] = unavailable(name, device, settings, n)
                        if row["skipped"] is None:
                            torch.manual_seed(settings["seed"])
                            fn, params = make_method(name, n, dtype, settings, device)
                            x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=mode != "fwd")
                            samples = time_method(fn, params, x, mode, settings["warmup"], settings["reps"], device)
                            seconds = summary(samples)["median"]
                            traffic = TRAFFIC[mode] * tokens * n * x.element_size()
                            row.update(ms=seconds * 1e3, samples=samples, gbps=traffic / seconds / 1e9)
                            row["bandwidth_fraction"] = row["gbps"] / bandwidth
                            del fn, params, x
                        rows.append(row)
                        print(_row_line(row), flush=True)
    add_relative(rows, settings["reference"])
    return {"device": device_label(device), "bandwidth_gbps": bandwidth, "bandwidth_source": bandwidth_source,
            "rows": rows}  # fmt: skip


def _row_line(row: dict[str, Any]) -> str:
    what = row["skipped"] or f"{row['ms']:.3f} ms, {row['gbps']:.1f} GB/s"
    return f"  n={row['hidden']} T={row['tokens']} {row['dtype']} {row['mode']:7s} {row['method']:9s}: {what}"


def add_relative(rows: list[dict[str, Any]], reference: str) -> None:
    times = {(r["hidden"], r["tokens"], r["dtype"], r["mode"], r["method"]): r.get("ms") for r in rows}
    for r in rows:
        ref = times.get((r["hidden"], r["tokens"], r["dtype"], r["mode"], reference))
        r["vs_reference"] = r["ms"] / ref if r.get("ms") and ref else None


def check_targets(result: dict[str, Any], settings: dict[str, Any]) -> str:
    t = settings["targets"]
    hits = [
        r for r in result["rows"]
        if r["method"] == "triton" and r["mode"] == "fwd+bwd" and r["hidden"] == t["hidden"] and r["tokens"] == t["tokens"]
    ]  # fmt: skip
    measured = [r for r in hits if r.get("ms")]
    if not measured:
        return (
            f"Targets (Triton fwd+bwd at {t['tokens']} x {t['hidden']}: >= {t['speedup_vs_torch']}x the torch path, "
            f">= {t['bandwidth_fraction']:.0%} of HBM bandwidth): pending, not measured in this run (needs a GPU and "
            "that shape)."
        )
    lines = []
    for r in measured:
        speedup = 1 / r["vs_reference"] if r["vs_reference"] else float("nan")
        ok_speed = "ok" if speedup >= t["speedup_vs_torch"] else "MISSED"
        ok_bw = "ok" if r["bandwidth_fraction"] >= t["bandwidth_fraction"] else "MISSED"
        lines.append(
            f"Targets ({r['dtype']}, Triton fwd+bwd at {t['tokens']} x {t['hidden']}): {speedup:.2f}x the torch path "
            f"(>= {t['speedup_vs_torch']}: {ok_speed}); {r['bandwidth_fraction']:.0%} of bandwidth "
            f"(>= {t['bandwidth_fraction']:.0%}: {ok_bw})"
        )
    return "\n".join(lines)


# ======================================================================================================================
# Tile sweep (--sweep): every Triton config at a few shapes, one short GPU run
# ======================================================================================================================
def sweep_cases(x: torch.Tensor, c: int, n_sms: int) -> tuple[list[tuple[str, str, Callable[[], object], Any]], dict]:
    """``(kernel, label, fn, tiles)`` for every timed variant of one shape (the tile spaces normalised, with the
    heuristic's pick, given the weights ``block_multiply`` would pass; the heuristic's pick with the other weight
    dtype; the public launchers; torch), and the heuristic's picks ``{kernel: tiles}``."""
    from gsoft.kernels import triton_gs as tg
    from gsoft.kernels.schedule import Pass

    rows, n = x.shape
    nb = n // c
    step = Pass(0, False, 0, 0)
    blocks = torch.randn(1, nb, c, c, device=x.device) / c**0.5
    mode = tg.dot_mode(x.dtype)
    w = tg.pass_weights(blocks, step, x, mode)  # what block_multiply passes (cast to x's dtype for many rows)
    y, grad = torch.empty_like(x), torch.randn_like(x)
    pick_m = tg.multiply_config(rows, c, nb, x.dtype, n_sms)
    pick_g = tg.grad_config(rows, c, nb, x.dtype, n_sms)
    cases: list[tuple[str, str, Callable[[], object], Any]] = []
    for tiles in tg.space(tg.MULTIPLY_TILES, c, pick_m):
        cases.append(("multiply", tiles.label(), lambda t=tiles: tg.launch_multiply(t, x, w, y, step, 0, 0), tiles))
    if mode == tg.DOT_HALF:  # the other choice of weight dtype, for PRECAST_MIN_ROWS
        w_other = blocks[0].contiguous() if w.dtype == x.dtype else blocks[0].to(x.dtype).contiguous()
        label = f"{pick_m.label()} W {str(w_other.dtype)[6:]}"
        cases.append(("multiply", label, lambda: tg.launch_multiply(pick_m, x, w_other, y, step, 0, 0), "W dtype"))
    cases.append(("multiply", "block_multiply()", lambda: tg.block_multiply(x, blocks, step, 0, 0), "launcher"))
    w_torch = blocks[0].to(x.dtype)
    cases.append(("multiply", "torch einsum", lambda: torch.einsum("nkj,kij->nki", x.view(rows, nb, c), w_torch),
                  "torch"))  # fmt: skip
    for tiles in tg.space(tg.GRAD_TILES, c, pick_g):
        run = lambda t=tiles: tg.launch_grad(t, grad, x, nb, c, step, 0, 0, n_sms)  # noqa: E731
        cases.append(("grad", tiles.label(), run, tiles))
    cases.append(("grad", "block_grad()", lambda: tg.block_grad(grad, x, blocks, step, 0, 0), "launcher"))
    return cases, {"multiply": pick_m, "grad": pick_g}


def run_sweep(settings: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Time the cases of :func:`sweep_cases` for every shape and dtype; None (after saying why) without a GPU."""
    if settings["device"] != "cuda" or not torch.cuda.is_available():
        print("The tile sweep times the Triton kernels on a CUDA GPU; none here, nothing to do "
              "(run `python recipes/bench_kernels.py --sweep` on a GPU machine).")  # fmt: skip
        return None
    import triton.testing
    from triton.runtime.errors import OutOfResources

    from gsoft.kernels import triton_gs as tg

    cfg = settings["sweep"]
    device = torch.device("cuda")
    n_sms = tg.sm_count(device)
    peak = float(cfg.get("peak_gbps", 4800))
    start = time.perf_counter()
    warm_up_gpu()
    rows_out = []
    for rows, n, c in cfg["shapes"]:
        for dtype_name in cfg["dtypes"]:
            torch.manual_seed(settings["seed"])
            x = torch.randn(rows, n, device=device, dtype=DTYPES[dtype_name])
            cases, picks = sweep_cases(x, c, n_sms)
            traffic = 2 * rows * n * x.element_size()  # multiply: read x, write y; grad: read dy and x
            for kernel, label, fn, tiles in cases:
                row = {"shape": f"{rows}x{n}x{c}", "rows": rows, "hidden": n, "c": c, "dtype": dtype_name,
                       "kernel": kernel, "config": label, "heuristic": tiles == picks[kernel],
                       "kind": tiles if isinstance(tiles, str) else "config"}  # fmt: skip
                try:
                    ms = triton.testing.do_bench(fn, warmup=cfg["warmup_ms"], rep=cfg["rep_ms"], return_mode="median")
                    row.update(ms=ms, gbps=traffic / ms / 1e6, peak_fraction=traffic / ms / 1e6 / peak)
                    if row["kind"] != "config" or row["heuristic"]:
                        row["call_us"] = back_to_back_us(fn)
                except OutOfResources as exc:
                    row["error"] = f"out of resources: {exc}"[:80]
                rows_out.append(row)
            del x, cases
    mark_best(rows_out)
    seconds = time.perf_counter() - start
    return {"device": device_label(device), "peak_gbps": peak, "seconds": seconds, "n_sms": n_sms, "rows": rows_out}


def warm_up_gpu(seconds: float = 0.5) -> None:
    """Matrix products for ``seconds``: an idle GPU runs at low clocks, which would slow the first configs timed."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def back_to_back_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Microseconds per call of ``calls`` back-to-back calls, one sync at the end: the host's launch cost where it
    exceeds the kernel's time (small shapes), else the kernel's."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def mark_best(rows: list[dict[str, Any]]) -> None:
    """Flag the fastest tile config per (shape, dtype, kernel) and the heuristic's slowdown against it."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"], r["kernel"]), []).append(r)
    for group in groups.values():
        timed = [r for r in group if r["kind"] == "config" and "ms" in r]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["ms"])
        pick = next((r for r in timed if r["heuristic"]), None)
        for r in group:
            r["best"] = r is best
            if pick is not None:
                r["heuristic_vs_best"] = pick["ms"] / best["ms"]


def sweep_table(report: dict[str, Any]) -> str:
    lines = [
        f"#### Triton tile sweep — {report['device']} ({report['n_sms']} SMs), {report['seconds']:.0f} s",
        "",
        f"do_bench median; GB/s = ideal traffic (multiply: read x + write y; grad: read dy + x) / time; % of "
        f"{report['peak_gbps']:.0f} GB/s. H = the heuristic's pick, * = fastest tile config. µs/call: 200 calls "
        "back to back, one sync (host launch cost when it exceeds the kernel time).",
        "",
        "| shape (rows x hidden x c) | dtype | kernel | config | ms | GB/s | % peak | | µs/call |",
        "|---|---|---|---|---:|---:|---:|---|---:|",
    ]
    for r in report["rows"]:
        mark = ("H" if r["heuristic"] else "") + ("*" if r.get("best") else "")
        if "ms" not in r:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['kernel']} | {r['config']} | {r['error']} | | | | |")
            continue
        call = f"{r['call_us']:.1f}" if "call_us" in r else ""
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['kernel']} | {r['config']} | {r['ms']:.4f} | "
                     f"{r['gbps']:.0f} | {r['peak_fraction']:.0%} | {mark} | {call} |")  # fmt: skip
    lines += ["", "Heuristic against the fastest config:"]
    seen = set()
    for r in report["rows"]:
        key = (r["shape"], r["dtype"], r["kernel"])
        if key in seen or "heuristic_vs_best" not in r:
            continue
        seen.add(key)
        best = next(b for b in report["rows"] if (b["shape"], b["dtype"], b["kernel"]) == key and b.get("best"))
        lines.append(f"- {key[0]} {key[1]} {key[2]}: heuristic {r['heuristic_vs_best']:.2f}x the best "
                     f"({best['config']}, {best['ms']:.4f} ms)")  # fmt: skip
    return "\n".join(lines) + "\n"


def sweep_main(settings: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    report = run_sweep(settings)
    if report is None:
        return {"sweep": None, "reason": "needs a CUDA GPU"}
    table = sweep_table(report)
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(), "settings": settings["sweep"], "sweep": report}  # fmt: skip
    (out_dir / "sweep.json").write_text(json.dumps(report, indent=1))
    (out_dir / "sweep.md").write_text(table)
    print(f"Wrote {out_dir / 'sweep.json'}, {out_dir / 'sweep.md'}")
    return report


# ======================================================================================================================
# Reporting
# ======================================================================================================================
def markdown_table(result: dict[str, Any], settings: dict[str, Any]) -> str:
    gs_cfg = settings["gs"]
    lines = [
        f"#### GS multiply — {result['device']}",
        "",
        f"GS b={gs_cfg['block_size']} m={gs_cfg.get('n_factors', 2)}; PEFT OFT b={settings['oft']['block_size']}; "
        f"PEFT BOFT b={settings['boft']['block_size']} m={settings['boft']['n_butterfly_factor']}. Median of "
        f"{settings['reps']} reps after {settings['warmup']} warm-up. GB/s = ideal fused activation traffic / time; "
        f"% BW against {result['bandwidth_gbps']:.0f} GB/s ({result['bandwidth_source']}).",
        "",
        "| hidden | tokens | dtype | mode | method | ms | × torch | GB/s | % BW |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        head = f"| {r['hidden']} | {r['tokens']} | {r['dtype']} | {r['mode']} | {NAMES[r['method']]} |"
        if r["skipped"]:
            lines.append(f"{head} {r['skipped']} | | | |")
            continue
        rel = f"{r['vs_reference']:.2f}x" if r["vs_reference"] else ""
        lines.append(f"{head} {r['ms']:.3g} | {rel} | {r['gbps']:.1f} | {r['bandwidth_fraction']:.0%} |")
    lines += ["", check_targets(result, settings)]
    if settings["device"] == "cpu":
        lines += [
            "",
            "Note: CPU run. The Triton and CUDA rows need a GPU (on a CPU Triton only runs in its interpreter, which "
            "is for tests, not timing); CPU numbers say nothing about the GPU kernels.",
        ]
    return "\n".join(lines) + "\n"


def save_plot(result: dict[str, Any], settings: dict[str, Any], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot (pip install matplotlib).")
        return None
    dtypes, modes = settings["dtypes"], settings["modes"]
    shapes = [(n, t) for n in settings["hidden"] for t in settings["tokens"]]
    methods = settings["methods"]
    fig, axes = plt.subplots(len(modes), len(dtypes), figsize=(6 * len(dtypes), 3.6 * len(modes)), squeeze=False)
    width = 0.8 / len(methods)
    for i, mode in enumerate(modes):
        for j, dtype in enumerate(dtypes):
            ax = axes[i][j]
            for k, method in enumerate(methods):
                values = []
                for n, t in shapes:
                    row = next(
                        (r for r in result["rows"] if (r["hidden"], r["tokens"], r["dtype"], r["mode"], r["method"])
                         == (n, t, dtype, mode, method)), None)  # fmt: skip
                    values.append(row["ms"] if row and row.get("ms") else 0.0)
                ax.bar([s + k * width for s in range(len(shapes))], values, width, label=NAMES[method])
            ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))])
            ax.set_xticklabels([f"n={n}\nT={t}" for n, t in shapes], fontsize=8)
            ax.set_ylabel("ms (log)")
            ax.set_yscale("log")
            ax.set_title(f"{dtype}, {mode}", fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"GS multiply, {result['device']} (missing bars: needs GPU)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the benchmark; returns the report that is also written to ``<output_dir>/results.json``."""
    try:
        return _main(argv)
    finally:
        bench_adapters._restore_fbd()  # the BOFT row installs bench_adapters' fbd stand-in; leave PEFT as found


def _main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    settings = load_settings(parse_args(argv))
    out_dir = Path(settings["output_dir"])
    if not out_dir.is_absolute():
        out_dir = REPO_ROOT / out_dir
    if settings["sweep"].get("enabled"):
        return sweep_main(settings, out_dir)
    print(f"bench_kernels on {settings['device']}: hidden {settings['hidden']}, tokens {settings['tokens']}, "
          f"{settings['dtypes']}, {settings['modes']}")  # fmt: skip
    result = run(settings)
    table = markdown_table(result, settings)
    print()
    print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tables.md").write_text(table)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in settings.items() if k not in ("device_overrides", "quick", "sweep")},
        "versions": versions(),
        "result": result,
    }
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    if settings.get("plot", True):
        plot = save_plot(result, settings, out_dir / f"bench_kernels_{settings['device']}.png")
        if plot:
            report["plot"] = str(plot)
    print(f"Wrote {out_dir / 'tables.md'}, {out_dir / 'results.json'}" + (f", {report['plot']}" if "plot" in report else ""))
    return report


if __name__ == "__main__":
    main()
