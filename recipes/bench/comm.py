"""Communication benchmark: 2 data-parallel workers on an emulated slow link, compressed gradients vs fp32 all-reduce.

    sudo python recipes/benchmark.py comm                    # every setting and rate (configs/bench/comm.yaml), ~30 min
    python recipes/benchmark.py comm --quick --no_netns      # smoke run over loopback: no root, no throttling (CI)

Each worker is a process of ``recipes/roberta_glue.py`` (one 2-process gloo job, as ``accelerate launch`` would make)
in its own network namespace; the two namespaces are joined by a veth pair whose two ends are shaped with
``tc qdisc ... tbf`` (egress of both ends, i.e. each direction) to 10, 50, 200, 1000 Mbit/s or left unthrottled.
Network namespaces, veth and tc need root: without it the benchmark says so and exits with status 0, writing nothing.
Unlike the other benchmarks the compared settings do not share one process: each run is a multi-process job.

Why this layout: the metric does not depend on the link, the time does. So every setting trains once, unthrottled,
for ``full_steps`` with an evaluation every ``eval_steps`` (metric at equal steps = its final metric; its curve gives
the metric reached at a given wall-clock), and then runs ``timing_steps`` at every throttled rate. Step time and wire
bytes are measured over steady-state windows of the recipe's own log (``metrics.jsonl`` records a wall-clock time
every ``logging_steps``): the first ``timing_warmup_steps`` (DDP's first iteration, PowerSGD's uncompressed warm-up)
and windows containing an evaluation are left out, and the interface counters (``/proc/<worker pid>/net/dev``,
sampled every 50 ms, which shows the worker's namespace) are interpolated at the window ends.

Writes ``comm.md`` (also printed), ``comm.json`` (every number) and ``comm.png`` into ``output_dir``, plus
``measurements.json`` (the raw numbers, for ``--render_only``), the runs (``runs/``) and the base model (``base/``).
"""

from __future__ import annotations

import bisect
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

import roberta_glue

from . import measure
from .glue import unknown_recipe_options
from .options import REPO_ROOT, BenchOptions, option_flags, parse_options

RECIPE = Path(roberta_glue.__file__).resolve()
# Set to 1 to take the "no root / no ip netns" path without dropping privileges (the test does; so can a user who
# wants to see the message).
SIMULATE_NO_NETNS_ENV = "GSOFT_BENCH_COMM_SIMULATE_NO_NETNS"
ADDRS = ("10.77.0.1", "10.77.0.2")


@dataclass
class CommOptions(BenchOptions):
    """Options of the communication benchmark (defaults: configs/bench/comm.yaml)."""

    output_dir: str = field(
        default="outputs/bench_comm",
        metadata={"help": "Runs go to <output_dir>/runs/...; comm.md, comm.json and comm.png here."},
    )
    no_netns: bool = field(
        default=False,
        metadata={"help": "Run both workers over loopback, unthrottled (no root needed): the pipeline without the "
                          "link emulation (CI)."},
    )
    setting_specs: dict = field(
        default_factory=dict,
        metadata={"help": "Compared settings: name -> recipe flags. The first one is the reference (fp32 all-reduce)."},
    )
    settings: list[str] = field(
        default_factory=list,
        metadata={"help": "Only these settings (names of setting_specs); empty = all. The first setting of "
                          "setting_specs (the reference) is always included."},
    )
    rates_mbit: list[Any] = field(
        default_factory=lambda: [10, 50, 200, 1000, None],
        metadata={"help": "Link rates in Mbit/s; null (or unthrottled) = the veth pair without a qdisc."},
    )
    tbf_burst_ms: float = field(default=1.0, metadata={"help": "tbf bucket: max(tbf_min_burst_bytes, rate x this)."})
    tbf_min_burst_bytes: int = field(default=4096, metadata={"help": "Smallest tbf bucket (bytes)."})
    tbf_latency_ms: float = field(default=50.0, metadata={"help": "How long a packet may wait in the tbf queue."})
    full_steps: int = field(default=300, metadata={"help": "Steps of each setting's full (unthrottled) run."})
    eval_steps: int = field(default=20, metadata={"help": "Evaluation every N steps of the full run (the curve)."})
    timing_steps: int = field(default=32, metadata={"help": "Steps of a timing run at each throttled rate."})
    timing_warmup_steps: int = field(
        default=12, metadata={"help": "Steps left out of the timing windows (DDP's first, PowerSGD's warm-up)."}
    )
    logging_steps: int = field(default=4, metadata={"help": "The recipe logs a wall-clock time every N steps."})
    job_timeout_s: float = field(default=900.0, metadata={"help": "Limit of one 2-process job (seconds)."})
    recipe: dict = field(
        default_factory=dict,
        metadata={"help": "Options of recipes/roberta_glue.py shared by every run.", "merge": True},
    )
    base: dict = field(
        default_factory=dict,
        metadata={"help": "How the base model is built once (model_config, base_pretrain_* recipe options).",
                  "merge": True},
    )
    render_only: bool = field(
        default=False,
        metadata={"help": "Re-render table, JSON and plot from <output_dir>/measurements.json (no runs)."},
    )
    pin_cpus: bool = field(
        default=True,
        metadata={"help": "Pin worker r to CPU r (when the machine has at least 2)."},
    )

    def __post_init__(self) -> None:
        self.rates_mbit = [_rate(r) for r in self.rates_mbit]
        names = list(self.setting_specs)
        unknown = [s for s in self.settings if s not in names]
        if unknown:
            raise ValueError(f"--settings {unknown} are not in setting_specs: {names}.")
        for where, options in [("recipe", self.recipe), ("base", self.base),
                               *((f"setting {name!r}", flags) for name, flags in self.setting_specs.items())]:
            missing = unknown_recipe_options(options)
            if missing:
                raise ValueError(f"{where} needs recipe options {missing} that recipes/roberta_glue.py does not have.")

    def selected_settings(self) -> dict[str, dict[str, Any]]:
        """The settings to run (name -> recipe flags): the reference first, then the chosen ones (or all)."""
        names = list(self.setting_specs)
        keep = names if not self.settings else [names[0]] + [s for s in self.settings if s != names[0]]
        return {name: self.setting_specs[name] for name in keep}

    def rates(self) -> list[Optional[float]]:
        """The link rates of this run: unthrottled only over loopback (--no_netns)."""
        return [None] if self.no_netns else list(self.rates_mbit)


def _rate(value: Any) -> Optional[float]:
    if value is None or str(value).strip().lower() in ("none", "null", "unthrottled"):
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--rates_mbit: {value!r} is neither a number (Mbit/s) nor unthrottled/null.") from None


# ----------------------------------------------------------------------------------------------------------------------
# Privileges and the emulated link
# ----------------------------------------------------------------------------------------------------------------------
def netns_unavailable_reason() -> Optional[str]:
    """Why the link emulation cannot run here (None when it can): network namespaces, veth pairs and tc qdiscs
    need root and iproute2's ``ip`` and ``tc``."""
    if os.environ.get(SIMULATE_NO_NETNS_ENV):
        return f"{SIMULATE_NO_NETNS_ENV} is set (simulating a machine without root / ip netns)"
    if os.geteuid() != 0:
        return f"it needs root for ip netns, veth and tc (running as uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"iproute2's {tool!r} is not installed"
    return None


def _sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


class Link:
    """Two network namespaces joined by a veth pair (10.77.0.1/24 <-> 10.77.0.2/24, loopback up in both); names are
    unique per process so that concurrent benchmarks do not collide, and ``close()`` deletes the namespaces (which
    deletes the veth pair). The host's own interfaces are never touched."""

    def __init__(self, tbf_burst_ms: float, tbf_min_burst_bytes: int, tbf_latency_ms: float) -> None:
        tag = f"{os.getpid() % 100000}"
        self.namespaces = (f"gbc{tag}a", f"gbc{tag}b")
        self.ifaces = (f"gbc{tag}a", f"gbc{tag}b")  # interface names live inside their own namespace
        self.addrs = ADDRS
        self.burst_ms, self.min_burst, self.latency_ms = tbf_burst_ms, tbf_min_burst_bytes, tbf_latency_ms
        self.rate_mbit: Optional[float] = None
        self._created: list[str] = []

    def __enter__(self) -> "Link":
        try:
            for ns in self.namespaces:
                _sh("ip", "netns", "add", ns)
                self._created.append(ns)
            tmp = (f"gbct{os.getpid() % 100000}a", f"gbct{os.getpid() % 100000}b")
            _sh("ip", "link", "add", tmp[0], "type", "veth", "peer", "name", tmp[1])
            for ns, iface, name, addr in zip(self.namespaces, self.ifaces, tmp, self.addrs):
                _sh("ip", "link", "set", name, "netns", ns, "name", iface)
                _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", iface)
                _sh("ip", "-n", ns, "link", "set", iface, "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
        except Exception:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for ns in self._created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._created = []

    def tbf_params(self, rate_mbit: float) -> dict[str, Any]:
        burst = max(self.min_burst, int(rate_mbit * 1e6 / 8 * self.burst_ms / 1000))
        return {"rate": f"{rate_mbit:g}mbit", "burst": burst, "latency": f"{self.latency_ms:g}ms"}

    def set_rate(self, rate_mbit: Optional[float]) -> None:
        """Shape both directions to ``rate_mbit`` (tbf on each end's egress), or remove the shaping (None)."""
        for ns, iface in zip(self.namespaces, self.ifaces):
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", iface, "root"], capture_output=True)
            if rate_mbit is not None:
                p = self.tbf_params(rate_mbit)
                _sh("tc", "-n", ns, "qdisc", "add", "dev", iface, "root", "tbf", "rate", p["rate"],
                    "burst", str(p["burst"]), "latency", p["latency"])
        self.rate_mbit = rate_mbit

    def tx_bytes(self) -> tuple[int, int]:
        """Bytes each end has sent so far (the veth counters, read inside each namespace)."""
        return tuple(int(_sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{iface}/statistics/tx_bytes"))
                     for ns, iface in zip(self.namespaces, self.ifaces))  # type: ignore[return-value]


def _proc_tx_bytes(pid: int, iface: str) -> Optional[int]:
    """tx bytes of ``iface`` as seen by process ``pid`` (``/proc/<pid>/net/dev`` shows that process's namespace)."""
    try:
        with open(f"/proc/{pid}/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == iface:
                    return int(rest.split()[8])
    except (OSError, ValueError, IndexError):
        return None
    return None


class CounterSampler(threading.Thread):
    """Samples both workers' tx byte counters every 50 ms while a job runs: (time, tx rank 0, tx rank 1)."""

    def __init__(self, pids: tuple[int, int], ifaces: tuple[str, str]) -> None:
        super().__init__(daemon=True)
        self.pids, self.ifaces = pids, ifaces
        self.samples: list[tuple[float, int, int]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            t = time.time()
            values = [_proc_tx_bytes(pid, iface) for pid, iface in zip(self.pids, self.ifaces)]
            if None not in values:
                self.samples.append((t, values[0], values[1]))
            self.stop_event.wait(0.05)

    def at(self, t: float) -> Optional[float]:
        """Total bytes sent by both workers by time ``t`` (linear interpolation); None outside the samples."""
        times = [s[0] for s in self.samples]
        i = bisect.bisect_left(times, t)
        if i == 0 or i >= len(times):
            return None
        (t0, a0, b0), (t1, a1, b1) = self.samples[i - 1], self.samples[i]
        w = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
        return (a0 + b0) + w * ((a1 + b1) - (a0 + b0))


# ----------------------------------------------------------------------------------------------------------------------
# One 2-worker job of the recipe
# ----------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(link: Optional[Link], recipe_config: Path, out: Path, options: dict[str, Any], timeout_s: float,
            pin_cpus: bool) -> dict[str, Any]:
    """Run the recipe as a 2-process gloo job (each process in its namespace, or both on loopback without ``link``)
    writing to ``out/recipe`` (worker logs: ``out/rank*.log``); returns results.json, the metrics.jsonl records,
    the counter samples and the interface totals of the job."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    port = 29500 if link is not None else _free_port()  # the namespaces are private: any port is free there
    argv = [sys.executable, str(RECIPE), "--config", str(recipe_config), "--output_dir", str(out / "recipe"),
            *option_flags(options)]
    cpus = sorted(os.sched_getaffinity(0))
    procs, logs = [], []
    before = link.tx_bytes() if link is not None else None
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="1" if link else "2",
                   LOCAL_RANK="0" if link else str(rank), MASTER_PORT=str(port),
                   MASTER_ADDR=link.addrs[0] if link else "127.0.0.1",
                   GLOO_SOCKET_IFNAME=link.ifaces[rank] if link else "lo",
                   OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        cmd = (["ip", "netns", "exec", link.namespaces[rank]] if link else []) + argv
        cpu = {cpus[rank]} if pin_cpus and len(cpus) >= 2 else None
        log = open(out / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO_ROOT),
                                      preexec_fn=(lambda c=cpu: os.sched_setaffinity(0, c)) if cpu else None))
    # Over loopback (no link) there is nothing to count: lo carries every other process's traffic too.
    sampler = CounterSampler((procs[0].pid, procs[1].pid), link.ifaces) if link else None
    if sampler is not None:
        sampler.start()
    start = time.time()
    try:
        for p in procs:
            p.wait(timeout=max(1.0, timeout_s - (time.time() - start)))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise RuntimeError(f"job {out} ran past {timeout_s:.0f} s (--job_timeout_s); logs in {out}")
    finally:
        if sampler is not None:
            sampler.stop_event.set()
            sampler.join()
        for log in logs:
            log.close()
    if any(p.returncode for p in procs):
        tails = "\n".join(f"--- rank {r} (exit {p.returncode}):\n" + "\n".join(
            (out / f"rank{r}.log").read_text().splitlines()[-15:]) for r, p in enumerate(procs))
        raise RuntimeError(f"job {out} failed:\n{tails}")
    after = link.tx_bytes() if link is not None else None
    results = json.loads((out / "recipe" / "results.json").read_text())
    if results.get("world_size") != 2 or len(set(results.get("rank_state_sha256", []))) != 1:
        raise RuntimeError(f"job {out} was not one 2-process job with replicas in sync: world_size "
                           f"{results.get('world_size')}, rank_state_sha256 {results.get('rank_state_sha256')}")
    records = [json.loads(line) for line in (out / "recipe" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"results": results, "records": records, "sampler": sampler,
            "wire_total_bytes": (sum(after) - sum(before)) if link is not None else None,
            "job_wall_s": time.time() - start}


def steady_state(job: dict[str, Any], warmup_steps: int) -> dict[str, Any]:
    """Mean step time and wire bytes per step per worker over logging windows after ``warmup_steps`` that contain no
    evaluation (an evaluation at step s runs after the log record of step s, so it falls in the window [s, next])."""
    logs = [(r["step"], r["time"]) for r in job["records"] if "loss" in r]
    evals = {r["step"] for r in job["records"] if any(k.startswith("eval_") for k in r)}
    sampler: Optional[CounterSampler] = job["sampler"]
    sent = {r["step"]: r.get("comm_bytes_sent") for r in job["records"] if "loss" in r}
    steps = seconds = 0.0
    wire: Optional[float] = 0.0
    counted: Optional[float] = 0.0
    for (s0, t0), (s1, t1) in zip(logs, logs[1:]):
        if s0 < warmup_steps or any(s0 <= e < s1 for e in evals):
            continue
        steps += s1 - s0
        seconds += t1 - t0
        b0, b1 = (sampler.at(t0), sampler.at(t1)) if sampler is not None else (None, None)
        wire = None if wire is None or b0 is None or b1 is None else wire + (b1 - b0)
        c0, c1 = sent.get(s0), sent.get(s1)
        counted = None if counted is None or c0 is None or c1 is None else counted + (c1 - c0)
    if not steps:
        raise RuntimeError(f"no clean logging window after step {warmup_steps}: raise timing_steps / full_steps")
    return {"step_s": seconds / steps, "window_steps": int(steps),
            "wire_bytes_per_step": None if wire is None else wire / steps / 2,  # per worker
            "counted_bytes_per_step": None if counted is None else counted / steps}


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------------
def _error_line(message: str) -> str:
    """The most telling line of a failed job's message (the last error line of the worker logs)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln or "what()" in ln]
    return (errors[-1] if errors else lines[-1] if lines else message)[:300]


def metric_at(curve: list[tuple[int, float]], step: float) -> Optional[float]:
    """The metric of the last evaluation at or before ``step`` (what a run stopped at that point would report)."""
    reached = [m for s, m in curve if s <= step + 1e-9]
    return reached[-1] if reached else None


def _rate_label(rate: Optional[float]) -> str:
    return "unthrottled" if rate is None else f"{rate:g} Mbit/s"


def benchmark(options: CommOptions) -> Optional[dict[str, Any]]:
    """Every setting's full run, then its timing runs at every throttled rate; None when the link emulation cannot
    run here (nothing is written then)."""
    out = Path(options.output_dir).resolve()
    if options.render_only:
        m = json.loads((out / "measurements.json").read_text())
        link = Link(*m["tbf"]) if m["tbf"] else None
        return finish(options, out, m["run"], m["rows"], m["rates"], link, (m["load_before"], m["load_after"]),
                      m["total_s"])
    if not options.no_netns:
        reason = netns_unavailable_reason()
        if reason is not None:
            print(f"comm: the link emulation cannot run here: {reason}. Run it as root on a machine with iproute2 "
                  f"(ip, tc), or pass --no_netns for the same pipeline over loopback without throttling. Nothing "
                  f"was written.", flush=True)
            return None
    settings = options.selected_settings()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    load_before = measure.load_average()

    # Base model, once: a 1-step single-process run of the recipe builds and pre-trains it.
    base_dir = out / "base"
    base_opts = {**options.recipe, **options.base, "max_steps": 1, "max_eval_samples": 10,
                 "output_dir": str(base_dir), "overwrite_output_dir": True}
    recipe_config = out / "recipe_config.yaml"
    recipe_config.write_text(yaml.safe_dump(base_opts, sort_keys=False))
    print(f"[comm] building the base model into {base_dir / 'base_model'} ...", flush=True)
    subprocess.run([sys.executable, str(RECIPE), "--config", str(recipe_config)], check=True, cwd=str(REPO_ROOT),
                   env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    run_opts = {**options.recipe, "model_name_or_path": str(base_dir / "base_model"),
                "logging_steps": options.logging_steps, "overwrite_output_dir": True}
    recipe_config.write_text(yaml.safe_dump(run_opts, sort_keys=False))

    rates = options.rates()
    throttled = [r for r in rates if r is not None]
    link_cm = None if options.no_netns else Link(options.tbf_burst_ms, options.tbf_min_burst_bytes,
                                                 options.tbf_latency_ms)
    rows: dict[str, dict[str, Any]] = {name: {"options": opts, "step_s": {}, "wire_bytes_per_step": {}}
                                       for name, opts in settings.items()}
    link = link_cm.__enter__() if link_cm is not None else None
    try:
        # 1. full runs, unthrottled: metric curve, metric at equal steps, unthrottled step time
        if link is not None:
            link.set_rate(None)
        for i, (name, opts) in enumerate(settings.items()):
            try:
                job = run_job(link, recipe_config, out / "runs" / f"{i:02d}_full",
                              {**opts, "max_steps": options.full_steps, "eval_steps": options.eval_steps},
                              options.job_timeout_s, options.pin_cpus)
            except RuntimeError as exc:
                if i == 0:
                    raise  # no reference, no benchmark
                # one broken setting is a result too (reported as failed), not a reason to lose the others
                rows[name]["error"] = _error_line(str(exc))
                print(f"[comm] {name}: FAILED: {rows[name]['error']}", flush=True)
                continue
            res = job["results"]
            ss = steady_state(job, options.timing_warmup_steps)
            row = rows[name]
            main = res["main_metric"]
            row.update(main_metric=main, metric=res["eval"][main], trainable_params=res["trainable_params"],
                       curve=[(r["step"], r[f"eval_{main}"]) for r in job["records"] if f"eval_{main}" in r],
                       steps=res["train_steps"],
                       counted_bytes_per_step=ss["counted_bytes_per_step"],
                       counted_bytes_per_step_whole_run=res["comm_bytes_sent"] / res["train_steps"],
                       uncompressed_bytes_per_step=res["comm_bytes_uncompressed"] / res["train_steps"]
                       if "comm_bytes_uncompressed" in res else None,
                       compression=res.get("compression"), full_run_wall_s=job["job_wall_s"],
                       full_run_wire_total_bytes=job["wire_total_bytes"])
            row["step_s"]["unthrottled"] = ss["step_s"]
            row["wire_bytes_per_step"]["unthrottled"] = ss["wire_bytes_per_step"]
            print(f"[comm] {i + 1}/{len(settings)} {name}: {main} {row['metric']:.4f} after {res['train_steps']} "
                  f"steps, {ss['step_s'] * 1e3:.1f} ms/step unthrottled, counted "
                  f"{measure.fmt_bytes(row['counted_bytes_per_step'])}/step, wire "
                  f"{measure.fmt_bytes(ss['wire_bytes_per_step'])}/step ({res['trainable_params']:,} trainable)",
                  flush=True)
        # 2. timing runs at every throttled rate
        for rate in throttled:
            link.set_rate(rate)
            for i, (name, opts) in enumerate(settings.items()):
                if "error" in rows[name]:
                    continue
                try:
                    job = run_job(link, recipe_config, out / "runs" / f"{i:02d}_{rate:g}mbit",
                                  {**opts, "max_steps": options.timing_steps, "eval_steps": 1000000,
                                   "max_eval_samples": 50}, options.job_timeout_s, options.pin_cpus)
                except RuntimeError as exc:
                    if i == 0:
                        raise
                    rows[name]["error"] = f"at {_rate_label(rate)}: {_error_line(str(exc))}"
                    print(f"[comm] {name}: FAILED: {rows[name]['error']}", flush=True)
                    continue
                ss = steady_state(job, options.timing_warmup_steps)
                rows[name]["step_s"][_rate_label(rate)] = ss["step_s"]
                rows[name]["wire_bytes_per_step"][_rate_label(rate)] = ss["wire_bytes_per_step"]
                rows[name].setdefault("counted_bytes_per_step_timing", {})[_rate_label(rate)] = \
                    ss["counted_bytes_per_step"]
                print(f"[comm] {_rate_label(rate)} {i + 1}/{len(settings)} {name}: {ss['step_s'] * 1e3:.1f} ms/step, "
                      f"wire {measure.fmt_bytes(ss['wire_bytes_per_step'])}/step (job {job['job_wall_s']:.0f} s)",
                      flush=True)
    finally:
        if link_cm is not None:
            link_cm.close()

    # the measurements first, so that a failure below loses nothing (--render_only re-renders from this file)
    run = asdict(options)
    tbf = [options.tbf_burst_ms, options.tbf_min_burst_bytes, options.tbf_latency_ms] if link_cm else None
    load_after = measure.load_average()
    (out / "measurements.json").write_text(json.dumps({"run": run, "rows": rows, "rates": rates, "tbf": tbf,
                                                       "load_before": load_before, "load_after": load_after,
                                                       "total_s": time.time() - t_start}, default=str))
    return finish(options, out, run, rows, rates, link_cm, (load_before, load_after), time.time() - t_start)


def finish(options: CommOptions, out: Path, run: dict[str, Any], rows: dict[str, dict[str, Any]],
           rates: list[Optional[float]], link: Optional[Link], loads: tuple[Any, Any],
           total_s: float) -> dict[str, Any]:
    """Derive, render and write the table, JSON and plot from the measurements (``run``: the options they were
    taken with)."""
    summary = summarize(run, rows, rates, link)
    summary["environment"] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "load_average_before": loads[0],
        "load_average_after": loads[1],
        "pinned": "worker r on CPU r" if run["pin_cpus"] and len(os.sched_getaffinity(0)) >= 2 else "not pinned",
        "link": "loopback (no_netns)" if run["no_netns"] else "veth between two network namespaces, tbf on both ends",
        "total_s": round(total_s, 1),
    }
    table = render_table(summary)
    print(table, flush=True)
    report = {**measure.report_header("comm", options), **summary}
    measure.write_outputs(out, "comm", table, report, plot(summary) if options.plot else None)
    print(f"[comm] done in {summary['environment']['total_s']:.0f} s", flush=True)
    return report


def summarize(run: dict[str, Any], rows: dict[str, dict[str, Any]], rates: list[Optional[float]],
              link: Optional[Link]) -> dict[str, Any]:
    """Derived numbers: bytes ratio, speed-up vs the reference, metric at equal wall-clock, targets."""
    failed = {name: row for name, row in rows.items() if "error" in row}
    rows = {name: row for name, row in rows.items() if "error" not in row}
    names = list(rows)
    ref = rows[names[0]]
    n = run["full_steps"]
    labels = [_rate_label(r) for r in rates]
    for name, row in rows.items():
        row["bytes_reduction_vs_ref"] = measure.ratio(ref.get("counted_bytes_per_step"),
                                                      row.get("counted_bytes_per_step"))
        row["speedup_vs_ref"] = {lab: measure.ratio(ref["step_s"][lab], row["step_s"][lab]) for lab in labels}
        row["delta_metric_points_vs_ref"] = 100 * (row["metric"] - ref["metric"])
    # Equal wall-clock budget at rate R: the time the fastest setting needs for full_steps at R. Every setting then
    # trained steps = budget / its step time (<= full_steps); its metric is that of its last evaluation by then.
    budgets = {}
    for lab in labels:
        budget = n * min(row["step_s"][lab] for row in rows.values())
        budgets[lab] = budget
        for row in rows.values():
            steps = min(n, budget / row["step_s"][lab])
            row.setdefault("equal_time_steps", {})[lab] = steps
            row.setdefault("metric_at_equal_time", {})[lab] = metric_at(row["curve"], steps)
    targets: dict[str, Any] = {}
    key50 = "50 Mbit/s"
    if key50 in labels and len(rows) > 1:
        compressed = [nm for nm in names[1:]]
        best = max(compressed, key=lambda nm: rows[nm]["speedup_vs_ref"][key50])
        within = [nm for nm in compressed if abs(rows[nm]["delta_metric_points_vs_ref"]) <= 0.5]
        best_within = max(within, key=lambda nm: rows[nm]["speedup_vs_ref"][key50]) if within else None
        targets["fastest_at_50mbit"] = {"setting": best, "speedup": rows[best]["speedup_vs_ref"][key50],
                                        "delta_points": rows[best]["delta_metric_points_vs_ref"]}
        targets["fastest_within_0.5_points_at_50mbit"] = None if best_within is None else {
            "setting": best_within, "speedup": rows[best_within]["speedup_vs_ref"][key50],
            "delta_points": rows[best_within]["delta_metric_points_vs_ref"]}
        hit = [nm for nm in within if rows[nm]["speedup_vs_ref"][key50] >= 10]
        targets["speed_and_metric_target_met"] = bool(hit)
    topk = [nm for nm, row in rows.items() if row["options"].get("grad_compression") == "topk"
            and row["options"].get("compression_ratio") == 0.01 and row["options"].get("local_steps", 1) == 1]
    if topk:
        red = rows[topk[0]]["bytes_reduction_vs_ref"]
        targets["topk_1pct_bytes_reduction"] = {"setting": topk[0], "reduction": red,
                                                "met": red is not None and red >= 30}
    return {"full_steps": n, "eval_steps": run["eval_steps"], "timing_steps": run["timing_steps"],
            "timing_warmup_steps": run["timing_warmup_steps"], "rates": labels,
            "tbf": {_rate_label(r): link.tbf_params(r) for r in rates if r is not None} if link else {},
            "equal_time_budget_s": budgets, "settings": rows, "failed": failed, "targets": targets}


def render_table(summary: dict[str, Any]) -> str:
    """Bytes and metric per setting, step time per rate, metric at equal wall-clock, failures and targets."""
    rows = summary["settings"]
    labels = summary["rates"]
    names = list(rows)
    main = rows[names[0]]["main_metric"]
    n = summary["full_steps"]
    wire_key = "50 Mbit/s" if "50 Mbit/s" in labels else labels[0]
    text = (f"Counted = bytes each worker sends per optimizer step by the compression state (payload incl. indices "
            f"and scales), over the steady-state steps of the timing windows, and over the whole {n}-step run (the "
            f"recipe's results.json comm_bytes_sent / train_steps: warm-ups, resets and uncompressed first steps "
            f"included); wire = measured on the veth in the steady state (per worker, TCP/IP headers, gloo control "
            f"messages and the recipe's loss logging included). {main} after {n} steps (unthrottled run; Δ in points "
            f"vs {names[0]}).\n\n")
    whole_ref = rows[names[0]].get("counted_bytes_per_step_whole_run")
    text += measure.markdown_table(
        ["setting", "counted bytes/step", "× fewer", "× fewer, whole run", "wire bytes/step", f"{main} @ {n} steps",
         "Δ pts"],
        [[name, measure.fmt_bytes(row["counted_bytes_per_step"]), measure.fmt_ratio(row["bytes_reduction_vs_ref"]),
          measure.fmt_ratio(measure.ratio(whole_ref, row.get("counted_bytes_per_step_whole_run"))),
          measure.fmt_bytes(row["wire_bytes_per_step"][wire_key]), f"{row['metric']:.4f}",
          f"{row['delta_metric_points_vs_ref']:+.1f}"] for name, row in rows.items()])
    text += (f"\nWire bytes measured at {wire_key}. Step time in ms (mean over steady-state steps "
             f"{summary['timing_warmup_steps']}-{summary['timing_steps']} of a timing run; unthrottled: the full "
             f"run's windows without evaluation) and speed-up vs {names[0]}:\n\n")
    text += measure.markdown_table(
        ["setting", *labels],
        [[name, *(f"{row['step_s'][lab] * 1e3:.0f} ({measure.fmt_ratio(row['speedup_vs_ref'][lab])})"
                  for lab in labels)] for name, row in rows.items()])
    budgets = ", ".join(f"{lab}: {b:.0f} s" for lab, b in summary["equal_time_budget_s"].items())
    text += (f"\n{main} at equal wall-clock: the budget at each rate is the time the fastest setting needs for {n} "
             f"steps there ({budgets}); each setting is scored by its last evaluation (every {summary['eval_steps']} "
             f"steps) within the budget (steps reached in parentheses; '—' = not even the first evaluation):\n\n")

    def at_equal_time(row: dict[str, Any], lab: str) -> str:
        metric = row["metric_at_equal_time"][lab]
        return f"{'—' if metric is None else f'{metric:.4f}'} ({row['equal_time_steps'][lab]:.0f})"

    text += measure.markdown_table(["setting", *labels], [[name, *(at_equal_time(row, lab) for lab in labels)]
                                                          for name, row in rows.items()])
    lines = []
    for name, row in summary.get("failed", {}).items():
        lines += ["", f"**{name} FAILED** (left out above): `{row['error']}`"]
    t = summary["targets"]
    lines.append("")
    if "fastest_at_50mbit" in t:
        f, w = t["fastest_at_50mbit"], t["fastest_within_0.5_points_at_50mbit"]
        lines.append(f"Target (50 Mbit/s: best compressed setting >= 10x faster per step than {names[0]} and within "
                     f"0.5 points at equal steps): {'MET' if t['speed_and_metric_target_met'] else 'MISSED'}. "
                     f"Fastest: {f['setting']} {f['speedup']:.1f}x ({f['delta_points']:+.1f} pts); fastest within "
                     f"0.5 points: " + ("none" if w is None else
                                        f"{w['setting']} {w['speedup']:.1f}x ({w['delta_points']:+.1f} pts)") + ".")
    if "topk_1pct_bytes_reduction" in t:
        k = t["topk_1pct_bytes_reduction"]
        red = "n/a" if k["reduction"] is None else f"{k['reduction']:.1f}x"
        lines.append(f"Target (Top-K 1% sends >= 30x fewer bytes incl. indices): {'MET' if k['met'] else 'MISSED'} "
                     f"({k['setting']}: {red}).")
    return text + "\n".join(lines) + "\n"


def plot(summary: dict[str, Any]) -> Any:
    """Step time against the link rate, and the metric against the wall-clock at 50 Mbit/s (or the first rate)."""
    import matplotlib.ticker

    rows, labels = summary["settings"], summary["rates"]
    fig, axes = measure.subplots(1, 2, 13, 5)
    ax1, ax2 = axes[0]
    xs = [float(lab.split()[0]) if lab != "unthrottled" else None for lab in labels]
    top = max([x for x in xs if x is not None], default=1000.0)
    x_unthr = top * 10
    xs = [x_unthr if x is None else x for x in xs]
    for name, row in rows.items():
        ax1.plot(xs, [row["step_s"][lab] * 1e3 for lab in labels], marker="o", label=name)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.minorticks_off()
    ax1.set_xticks(xs)
    ax1.set_xticklabels([lab.replace(" Mbit/s", "") for lab in labels])
    ax1.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax1.set_xlabel("link rate (Mbit/s)")
    ax1.set_ylabel("step time (ms)")
    ax1.set_title("step time vs link rate (2 workers)")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    lab = "50 Mbit/s" if "50 Mbit/s" in labels else labels[0]
    for name, row in rows.items():
        curve = row["curve"]
        ax2.plot([s * row["step_s"][lab] for s, _ in curve], [m for _, m in curve], marker=".", label=name)
    ax2.set_xscale("log")
    ax2.set_xlabel(f"training wall-clock at {lab} (s, steps x step time)")
    ax2.set_ylabel(next(iter(rows.values()))["main_metric"])
    ax2.set_title(f"metric vs wall-clock at {lab}")
    ax2.grid(True, which="both", alpha=0.3)
    return fig


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict[str, Any]]:
    """Run the benchmark; returns the report that is also written to ``<output_dir>/comm.json`` (None, after saying
    why, where the link emulation cannot run)."""
    return benchmark(parse_options(CommOptions, "comm", argv, __doc__))
