"""Speed of the GS multiply ``y = Q x`` per backend, against a dense GEMM and PEFT's OFT / BOFT multiplies.

Usage::

    python recipes/benchmark.py kernels                 # configs/bench/kernels.yaml (GPU: the full grid)
    python recipes/benchmark.py kernels --quick         # smoke test, a few seconds on a CPU
    python recipes/benchmark.py kernels --hidden 4096 --tokens 16384 --dtypes bf16 --methods torch,triton
    python recipes/benchmark.py kernels --sweep         # GPU: time every Triton tile config at a few shapes (< 1 min)

For every hidden size ``n``, token count ``T`` (rows of ``x``), activation dtype and mode (``fwd``: ``y = Q x``;
``fwd+bwd``: also the backward to ``x`` and to the parameters) it times each method side by side (median of ``reps``
after ``warmup``, synchronised on a GPU) and reports

* **ms** and **× torch** (time / the ``reference`` row's time at the same shape, lower is better);
* **GB/s**: the activation traffic an ideal fused kernel needs (``fwd``: read x, write y = ``2 T n`` elements;
  ``fwd+bwd``: plus read dy and x, write dx = ``5 T n``), divided by the time; and **% BW**: that against the memory
  bandwidth, the GPU's spec-sheet HBM bandwidth where the device is known (else, and on a CPU, a measured large copy).

Methods (see the config for the parameter counts): ``torch`` (gsoft's reference path), ``triton`` and ``cuda``
(gsoft's fused kernels; "needs GPU" rows on a CPU), ``dense`` (``x @ Q^T`` with ``Q`` materialised once),
``peft_oft`` (PEFT's ``OFTRotationModule`` forward) and ``peft_boft`` (PEFT BOFT's per-call rotation: dense
block-diagonal matrices, permutation bmm, product, ``x @ R``; its block-diagonal step uses ``measure.boft_fbd``'s
pure-PyTorch stand-in because PEFT's ``fbd_cuda`` extension is broken). Every row starts from given orthogonal
blocks: the Cayley transform is excluded everywhere.

Outputs in ``output_dir``: ``kernels.md``, ``kernels.json`` and ``kernels.png``.

``--sweep`` runs the tile sweep instead: for each shape of ``sweep_shapes`` (rows x hidden x block size ``c``, one
block-diagonal pass with ``hidden / c`` blocks, as the two-factor GSOFT plan runs it) and each of ``sweep_dtypes``,
it times the multiply and the block-gradient kernels with every config of their tile spaces
(``gsoft.kernels.triton_gs.MULTIPLY_TILES`` / ``GRAD_TILES``, normalised per block size) and the heuristic's pick
(``triton.testing.do_bench``, median; the weights in the dtype ``block_multiply`` would pass, plus the heuristic's
pick with the other one), plus the public launchers (heuristic, dispatch and weight cast included) and a torch
einsum of the same multiply. It prints one table (ms, GB/s of the ideal traffic: read x and write y, or read dy and
x; % of ``sweep_peak_gbps``), marking the heuristic's pick (``H``) and the fastest config (``*``), and writes
``kernels_sweep.md`` and ``kernels_sweep.json``. It needs a CUDA GPU; on a CPU it says so and exits 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, get_args

import torch

from . import measure
from .options import BenchOptions, parse_options

Dtype = Literal["fp16", "bf16", "fp32"]
Method = Literal["torch", "triton", "cuda", "dense", "peft_oft", "peft_boft"]
Mode = Literal["fwd", "fwd+bwd"]
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


@dataclass
class KernelsOptions(BenchOptions):
    """Options of the GS-multiply benchmark (defaults: configs/bench/kernels.yaml)."""

    output_dir: str = field(default="outputs/bench_kernels", metadata={"help": "Where kernels.md/.json/.png go."})
    hidden: list[int] = field(default_factory=lambda: [768, 1024, 4096], metadata={"help": "n, the rotated width."})
    tokens: list[int] = field(default_factory=lambda: [4096, 16384, 65536], metadata={"help": "Rows of x."})
    dtypes: list[Dtype] = field(default_factory=lambda: ["fp16", "bf16"],
                                metadata={"help": f"Activation dtypes ({', '.join(get_args(Dtype))})."})
    modes: list[Mode] = field(default_factory=lambda: ["fwd", "fwd+bwd"],
                              metadata={"help": f"Modes ({', '.join(get_args(Mode))})."})
    gs: dict = field(default_factory=lambda: {"block_size": 16, "n_factors": 2},
                     metadata={"help": "The GS matrix: block_size, n_factors."})
    oft: dict = field(default_factory=lambda: {"block_size": 32}, metadata={"help": "PEFT OFT: block_size."})
    boft: dict = field(default_factory=lambda: {"block_size": 16, "n_butterfly_factor": 2},
                       metadata={"help": "PEFT BOFT: block_size, n_butterfly_factor."})
    methods: list[Method] = field(default_factory=lambda: list(NAMES),
                                  metadata={"help": f"Methods ({', '.join(get_args(Method))}), in order."})
    reference: dict = field(default_factory=lambda: {"torch": "torch"},
                            metadata={"help": "Ratio columns: {label: method}, time / that method's at the shape."})
    warmup: int = field(default=3, metadata={"help": "Untimed calls per row first."})
    reps: int = field(default=20, metadata={"help": "Timed calls per row (the table shows the median)."})
    device: measure.DeviceName = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda."})
    threads: Optional[int] = field(default=None, metadata={"help": "torch.set_num_threads on the CPU (null: default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the blocks and inputs."})
    targets: dict = field(
        default_factory=lambda: {"speedup_vs_torch": 2.0, "bandwidth_fraction": 0.6, "tokens": 16384, "hidden": 4096},
        metadata={"help": "Triton fwd+bwd at tokens x hidden: >= speedup_vs_torch and >= bandwidth_fraction."},
    )
    sweep: bool = field(default=False, metadata={"help": "Run the Triton tile sweep instead (GPU)."})
    sweep_shapes: list[list[int]] = field(
        default_factory=lambda: [[4096, 768, 64], [16384, 3072, 64], [65536, 4096, 64], [65536, 4096, 256],
                                 [65536, 4096, 16]],
        metadata={"help": "[rows, hidden, c] shapes of the sweep: hidden / c blocks of c x c in one pass."},
    )
    sweep_dtypes: list[Dtype] = field(default_factory=lambda: ["bf16", "fp32"],
                                      metadata={"help": f"Sweep dtypes ({', '.join(get_args(Dtype))})."})
    sweep_warmup_ms: float = field(default=5.0, metadata={"help": "do_bench warm-up per config (ms)."})
    sweep_rep_ms: float = field(default=20.0, metadata={"help": "do_bench timed window per config (ms)."})
    sweep_peak_gbps: float = field(default=4800.0, metadata={"help": "The sweep's '% peak' bandwidth (GB/s)."})
    device_overrides: dict = field(default_factory=dict, metadata={"help": "Options per device type (cpu, cuda)."})

    def __post_init__(self) -> None:
        measure.resolve_device(self.device)  # --device cuda without a GPU fails here, naming the fix


# ======================================================================================================================
# Methods: each returns fn(x) -> y and the parameters whose gradients the backward computes
# ======================================================================================================================
def gs_blocks(n: int, options: KernelsOptions, device: torch.device) -> torch.Tensor:
    from gsoft import gs

    b, m = options.gs["block_size"], options.gs.get("n_factors", 2)
    skew = 0.1 * torch.randn(m, n // b, gs.n_skew_params(b))
    return gs.orthogonal_blocks(skew, b).to(device)


def make_method(name: str, n: int, dtype: torch.dtype, options: KernelsOptions,
                device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[torch.Tensor]]:
    import gsoft
    from gsoft import gs

    if name in ("torch", "triton", "cuda"):
        blocks = gs_blocks(n, options, device).requires_grad_()
        if name == "torch":  # the reference path needs one dtype; the fused kernels read fp32 blocks directly
            return (lambda x: gsoft.gs_apply(x, blocks.to(x.dtype), backend="torch")), [blocks]
        return (lambda x: gsoft.gs_apply(x, blocks, backend=name)), [blocks]
    if name == "dense":
        q = gs.materialize(gs_blocks(n, options, device)).to(dtype).requires_grad_()
        return (lambda x: x @ q.T), [q]
    if name == "peft_oft":
        from peft.tuners.oft.layer import OFTRotationModule

        b = options.oft["block_size"]
        module = OFTRotationModule(n // b, b * (b - 1) // 2, b, n, use_cayley_neumann=False).to(device)
        blocks = gs.orthogonal_blocks(0.1 * torch.randn(n // b, b * (b - 1) // 2, device=device), b)
        blocks.requires_grad_()
        module._cayley_batch = lambda *args, **kwargs: blocks  # PEFT's forward, minus the Cayley transform
        return module, [blocks]
    return make_boft(n, options, device)


def make_boft(n: int, options: KernelsOptions, device: torch.device):
    """PEFT BOFT's rotation exactly as ``peft.tuners.boft.layer.Linear.forward`` builds and applies it (inside
    ``measure.boft_fbd("torch")``: the block-diagonal matrices come from the stand-in)."""
    from peft import BOFTConfig, get_peft_model
    from peft.tuners.boft.layer import FastBlockDiag

    from gsoft import gs

    b, m = options.boft["block_size"], options.boft["n_butterfly_factor"]
    holder = torch.nn.Sequential(torch.nn.Linear(n, n, bias=False))
    model = get_peft_model(holder, BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m, target_modules=["0"]))
    layer = model.base_model.model[0]
    boft_p = layer.boft_P.to(device)
    shape = layer.boft_R["default"].shape  # (m, n / b, b, b)
    blocks = gs.orthogonal_blocks(0.1 * torch.randn(*shape[:2], gs.n_skew_params(b)), b).to(device).requires_grad_()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        block_diagonal = FastBlockDiag.apply(blocks).to(x)  # (m, n, n)
        batch = torch.bmm(boft_p.to(x), torch.bmm(block_diagonal, boft_p.to(x).permute(0, 2, 1)))
        rotation = batch[0]
        for i in range(1, batch.shape[0]):
            rotation = batch[i] @ rotation
        return x @ rotation

    return rotate, [blocks]


def unavailable(name: str, device: torch.device, options: KernelsOptions, n: int) -> Optional[str]:
    """Why a method cannot run here ("needs GPU", ...), or None."""
    if name not in ("triton", "cuda"):
        return None
    if device.type != "cuda":
        return "needs GPU"
    from gsoft.kernels.availability import unavailable_reason

    reason = unavailable_reason(name, torch.empty(1, n, device=device), gs_blocks(n, options, device))
    return reason[:80] if reason else None


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

    return measure.repeat_timed(step, device, reps, warmup)


def memory_bandwidth(device: torch.device) -> tuple[float, str]:
    """GB/s to compare against: the spec sheet for known GPUs, else a measured copy of 256 MiB (read + write)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, gbps in HBM_GBPS.items():
            if fragment in name:
                return float(gbps), f"{name} spec-sheet HBM bandwidth"
    src = torch.empty(2**26, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = min(measure.repeat_timed(lambda: dst.copy_(src), device, reps=5))
    return 2 * src.numel() * 4 / seconds / 1e9, "measured copy bandwidth (read + write)"


def run(options: KernelsOptions, device: torch.device) -> dict[str, Any]:
    """Every (hidden, tokens, dtype, mode, method) row, timed or marked with why it cannot run."""
    bandwidth, bandwidth_source = memory_bandwidth(device)
    rows = []
    for n in options.hidden:
        for tokens in options.tokens:
            for dtype_name in options.dtypes:
                for mode in options.modes:
                    for name in options.methods:
                        row = {"hidden": n, "tokens": tokens, "dtype": dtype_name, "mode": mode, "method": name,
                               "skipped": unavailable(name, device, options, n)}
                        if row["skipped"] is None:
                            torch.manual_seed(options.seed)
                            fn, params = make_method(name, n, DTYPES[dtype_name], options, device)
                            x = torch.randn(tokens, n, device=device, dtype=DTYPES[dtype_name],
                                            requires_grad=mode != "fwd")
                            samples = time_method(fn, params, x, mode, options.warmup, options.reps, device)
                            seconds = measure.summary(samples)["median"]
                            gbps = TRAFFIC[mode] * tokens * n * x.element_size() / seconds / 1e9
                            row.update(ms=seconds * 1e3, samples=samples, gbps=gbps,
                                       bandwidth_fraction=gbps / bandwidth)
                            del fn, params, x
                        rows.append(row)
                        what = row["skipped"] or f"{row['ms']:.3f} ms, {row['gbps']:.1f} GB/s"
                        print(f"  n={n} T={tokens} {dtype_name} {mode:7s} {name:9s}: {what}", flush=True)
    measure.add_ratios(rows, options.reference, {"ms": "ms"}, key="method",
                       group=lambda r: (r["hidden"], r["tokens"], r["dtype"], r["mode"]))
    return {"device": measure.device_label(device), "bandwidth_gbps": bandwidth, "bandwidth_source": bandwidth_source,
            "rows": rows}


def check_targets(result: dict[str, Any], options: KernelsOptions) -> str:
    """The Triton fwd+bwd row at the target shape against the speed-up and bandwidth targets (reported)."""
    t = options.targets
    measured = [r for r in result["rows"] if r["method"] == "triton" and r["mode"] == "fwd+bwd" and r.get("ms")
                and r["hidden"] == t["hidden"] and r["tokens"] == t["tokens"]]
    if not measured:
        return (f"Targets (Triton fwd+bwd at {t['tokens']} x {t['hidden']}: >= {t['speedup_vs_torch']}x the torch "
                f"path, >= {t['bandwidth_fraction']:.0%} of HBM bandwidth): pending, not measured in this run (needs "
                "a GPU and that shape).")
    lines = []
    for r in measured:
        vs_torch = r["relative"].get("ms_vs_torch")
        speedup = 1 / vs_torch if vs_torch else float("nan")
        ok_speed = "ok" if speedup >= t["speedup_vs_torch"] else "MISSED"
        ok_bw = "ok" if r["bandwidth_fraction"] >= t["bandwidth_fraction"] else "MISSED"
        lines.append(f"Targets ({r['dtype']}, Triton fwd+bwd at {t['tokens']} x {t['hidden']}): {speedup:.2f}x the "
                     f"torch path (>= {t['speedup_vs_torch']}: {ok_speed}); {r['bandwidth_fraction']:.0%} of "
                     f"bandwidth (>= {t['bandwidth_fraction']:.0%}: {ok_bw})")
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
                  "torch"))
    for tiles in tg.space(tg.GRAD_TILES, c, pick_g):
        cases.append(("grad", tiles.label(), lambda t=tiles: tg.launch_grad(t, grad, x, nb, c, step, 0, 0, n_sms),
                      tiles))
    cases.append(("grad", "block_grad()", lambda: tg.block_grad(grad, x, blocks, step, 0, 0), "launcher"))
    return cases, {"multiply": pick_m, "grad": pick_g}


def run_sweep(options: KernelsOptions) -> dict[str, Any]:
    """Time the cases of :func:`sweep_cases` for every shape and dtype (on the CUDA GPU)."""
    import triton.testing
    from triton.runtime.errors import OutOfResources

    from gsoft.kernels import triton_gs as tg

    device = torch.device("cuda")
    n_sms = tg.sm_count(device)
    start = time.perf_counter()
    warm_up_gpu()
    rows_out = []
    bar = measure.progress(len(options.sweep_shapes) * len(options.sweep_dtypes), "sweep")
    for rows, n, c in options.sweep_shapes:
        for dtype_name in options.sweep_dtypes:
            torch.manual_seed(options.seed)
            x = torch.randn(rows, n, device=device, dtype=DTYPES[dtype_name])
            cases, picks = sweep_cases(x, c, n_sms)
            traffic = 2 * rows * n * x.element_size()  # multiply: read x, write y; grad: read dy and x
            for kernel, label, fn, tiles in cases:
                row = {"shape": f"{rows}x{n}x{c}", "rows": rows, "hidden": n, "c": c, "dtype": dtype_name,
                       "kernel": kernel, "config": label, "heuristic": tiles == picks[kernel],
                       "kind": tiles if isinstance(tiles, str) else "config"}
                try:
                    ms = triton.testing.do_bench(fn, warmup=options.sweep_warmup_ms, rep=options.sweep_rep_ms,
                                                 return_mode="median")
                    gbps = traffic / ms / 1e6
                    row.update(ms=ms, gbps=gbps, peak_fraction=gbps / options.sweep_peak_gbps)
                    if row["kind"] != "config" or row["heuristic"]:
                        row["call_us"] = back_to_back_us(fn)
                except OutOfResources as exc:  # a tile config too large for this GPU: a row of the table
                    row["error"] = f"out of resources: {exc}"[:80]
                rows_out.append(row)
            del x, cases
            bar.update()
    bar.close()
    mark_best(rows_out)
    return {"device": measure.device_label(device), "peak_gbps": options.sweep_peak_gbps,
            "seconds": time.perf_counter() - start, "n_sms": n_sms, "rows": rows_out}


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
    return measure.timed(lambda: [fn() for _ in range(calls)], torch.device("cuda")) / calls * 1e6


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
    text = (
        f"#### Triton tile sweep — {report['device']} ({report['n_sms']} SMs), {report['seconds']:.0f} s\n\n"
        f"do_bench median; GB/s = ideal traffic (multiply: read x + write y; grad: read dy + x) / time; % of "
        f"{report['peak_gbps']:.0f} GB/s. H = the heuristic's pick, * = fastest tile config. µs/call: 200 calls "
        "back to back, one sync (host launch cost when it exceeds the kernel time).\n\n"
    )
    cells = []
    for r in report["rows"]:
        head = [r["shape"], r["dtype"], r["kernel"], r["config"]]
        if "ms" not in r:
            cells.append(head + [r["error"], "", "", "", ""])
            continue
        mark = ("H" if r["heuristic"] else "") + ("*" if r.get("best") else "")
        cells.append(head + [f"{r['ms']:.4f}", f"{r['gbps']:.0f}", f"{r['peak_fraction']:.0%}", mark,
                             f"{r['call_us']:.1f}" if "call_us" in r else ""])
    text += measure.markdown_table(["shape (rows x hidden x c)", "dtype", "kernel", "config", "ms", "GB/s", "% peak",
                                    "", "µs/call"], cells, align="llllrrrlr")
    lines = ["", "Heuristic against the fastest config:"]
    seen = set()
    for r in report["rows"]:
        key = (r["shape"], r["dtype"], r["kernel"])
        if key in seen or "heuristic_vs_best" not in r:
            continue
        seen.add(key)
        best = next(b for b in report["rows"] if (b["shape"], b["dtype"], b["kernel"]) == key and b.get("best"))
        lines.append(f"- {key[0]} {key[1]} {key[2]}: heuristic {r['heuristic_vs_best']:.2f}x the best "
                     f"({best['config']}, {best['ms']:.4f} ms)")
    return text + "\n".join(lines) + "\n"


# ======================================================================================================================
# Reporting
# ======================================================================================================================
def markdown(result: dict[str, Any], options: KernelsOptions, device: torch.device) -> str:
    gs, boft = options.gs, options.boft
    text = (
        f"#### GS multiply — {result['device']}\n\n"
        f"GS b={gs['block_size']} m={gs.get('n_factors', 2)}; PEFT OFT b={options.oft['block_size']}; PEFT BOFT "
        f"b={boft['block_size']} m={boft['n_butterfly_factor']}. Median of {options.reps} reps after "
        f"{options.warmup} warm-up. GB/s = ideal fused activation traffic / time; % BW against "
        f"{result['bandwidth_gbps']:.0f} GB/s ({result['bandwidth_source']}).\n\n"
    )
    header = ["hidden", "tokens", "dtype", "mode", "method", "ms", *[f"× {k}" for k in options.reference], "GB/s",
              "% BW"]
    cells = []
    for r in result["rows"]:
        head = [r["hidden"], r["tokens"], r["dtype"], r["mode"], NAMES[r["method"]]]
        if r["skipped"]:
            cells.append(head + [r["skipped"]] + [""] * (len(header) - 6))
            continue
        ratios = [measure.fmt_ratio(r["relative"].get(f"ms_vs_{k}")) for k in options.reference]
        cells.append(head + [f"{r['ms']:.3g}", *ratios, f"{r['gbps']:.1f}", f"{r['bandwidth_fraction']:.0%}"])
    text += measure.markdown_table(header, cells, align="rrlll" + "r" * (len(header) - 5))
    text += "\n" + check_targets(result, options) + "\n"
    if device.type == "cpu":
        text += ("\nNote: CPU run. The Triton and CUDA rows need a GPU (on a CPU Triton only runs in its interpreter, "
                 "which is for tests, not timing); CPU numbers say nothing about the GPU kernels.\n")
    return text


def plot(result: dict[str, Any], options: KernelsOptions) -> Any:
    """Grouped bars (ms, log scale) per shape and method; one panel per mode and dtype."""
    shapes = [(n, t) for n in options.hidden for t in options.tokens]
    fig, axes = measure.subplots(len(options.modes), len(options.dtypes), 6 * len(options.dtypes),
                                 3.6 * len(options.modes))
    width = 0.8 / len(options.methods)
    ms = {(r["hidden"], r["tokens"], r["dtype"], r["mode"], r["method"]): r.get("ms") or 0.0 for r in result["rows"]}
    for i, mode in enumerate(options.modes):
        for j, dtype in enumerate(options.dtypes):
            ax = axes[i][j]
            for k, method in enumerate(options.methods):
                ax.bar([s + k * width for s in range(len(shapes))],
                       [ms.get((n, t, dtype, mode, method), 0.0) for n, t in shapes], width, label=NAMES[method])
            ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))])
            ax.set_xticklabels([f"n={n}\nT={t}" for n, t in shapes], fontsize=8)
            ax.set_ylabel("ms (log)")
            ax.set_yscale("log")
            ax.set_title(f"{dtype}, {mode}", fontsize=10)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"GS multiply, {result['device']} (missing bars: needs GPU)", fontsize=10)
    return fig


def parse(argv: Optional[Sequence[str]] = None) -> KernelsOptions:
    """The options: configs/bench/kernels.yaml < device_overrides < quick_overrides < the command line."""
    return parse_options(KernelsOptions, "kernels", argv, __doc__,
                         device_of=lambda o: measure.resolve_device(o.device).type)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark (or the tile sweep); returns the report that is also written to ``kernels.json``."""
    options = parse(argv)
    device = measure.resolve_device(options.device)
    if options.sweep:
        if device.type != "cuda":
            print("The tile sweep times the Triton kernels on a CUDA GPU; none here, nothing to do "
                  "(run `python recipes/benchmark.py kernels --sweep` on a GPU machine).")
            return {"sweep": None, "reason": "needs a CUDA GPU"}
        report = {**measure.report_header("kernels", options, "triton"), "sweep": run_sweep(options)}
        table = sweep_table(report["sweep"])
        print(table)
        measure.write_outputs(options.output_dir, "kernels_sweep", table, report)
        return report
    print(f"kernels on {device}: hidden {options.hidden}, tokens {options.tokens}, {options.dtypes}, {options.modes}")
    with measure.boft_fbd("torch"), measure.cpu_threads(device, options.threads):
        result = run(options, device)
    table = markdown(result, options, device)
    print("\n" + table)
    report = {**measure.report_header("kernels", options, "triton"), "result": result}
    measure.write_outputs(options.output_dir, "kernels", table, report, plot(result, options) if options.plot else None)
    return report
