"""Volunteer training over the internet with hivemind (Learning@home, DeDLOC): peers on a DHT train one adapter.

hivemind's own machinery does the work: a :class:`hivemind.DHT` finds the peers, and :class:`hivemind.Optimizer`
counts the samples the swarm has processed, moves every peer to the next *epoch* once ``target_batch_size`` of them
are in, averages with whichever peers are there (a butterfly all-reduce that survives peers leaving), and hands the
current state to a peer that joins late or falls behind. This module adds what a fine-tuning run needs on top:

- :class:`VolunteerConfig`: the settings, checked when made, with the two modes. ``local_updates``: every peer steps
  its own optimizer on every batch and the peers average their parameters every
  ``average_state_every`` epochs (gsoft's compressed-updates mode over a swarm: local steps, then a state average).
  ``gradients``: the peers accumulate ``target_batch_size`` samples of gradients, average them (optionally with
  hivemind's PowerSGD) and take one optimizer step together (synchronous large-batch training).
- Codecs: hivemind's wire format is a closed set of six stateless codecs (``runtime.proto``'s ``CompressionType``),
  so a hivemind run compresses with those (:data:`CODECS`). Of gsoft's compressors, the stateless ones fit: fp16 is
  hivemind's own format, and gsoft's unbiased int8 (:class:`~gsoft.distributed.compressors.Int8`) is sent as a
  uniform 8-bit message whose codebook is its 255 levels, which every peer's decoder reads. Top-K, sign and Rand-K
  need error feedback, a residual per process and tensor kept across rounds, and hivemind regroups the peers and
  re-partitions the tensors every round; PowerSGD is hivemind's own (``powersgd_rank``).
- :func:`install_codecs`: checks every codec once with a round trip. hivemind 1.1.12's 8-bit decoders read their
  header with ``int()`` of a one-element array, a TypeError under numpy 2.x; the all-reduce then drops the parts it
  cannot decode and reports the round as a success. When that check fails, gsoft decodes those messages itself (the
  same wire format, so peers stay compatible). It also counts the bytes of every tensor message this peer sends and
  receives (:class:`TrafficCounter`).
- :func:`make_optimizer`: a :class:`hivemind.Optimizer` that records the outcome of every averaging round
  (:class:`RoundLog`): succeeded, failed (hivemind logs these at DEBUG and continues with local state), or partial
  (some peers' parts never arrived: hivemind logs a warning in its averaging process and calls the round a success).
  Each failed or partial round is logged as a warning with its reason and counted; ``max_failed_rounds`` of them in
  a row stop the run with :class:`AveragingFailed`.

hivemind is an optional dependency (``pip install gsoft[hivemind]``), imported by :func:`start_dht` and
:func:`make_optimizer`; importing this module does not need it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

#: ``--hivemind_compression`` name -> hivemind's ``CompressionType`` (the wire format). ``blockwise8bit`` is left out:
#: it needs bitsandbytes 0.45, which hivemind pins.
CODECS = {
    "none": "NONE",
    "fp16": "FLOAT16",
    "scaled_fp16": "MEANSTD_16BIT",
    "uniform8bit": "UNIFORM_8BIT",
    "quantile8bit": "QUANTILE_8BIT",
    "int8": "UNIFORM_8BIT",  # gsoft's QSGD int8, sent in the uniform 8-bit format (see _GsoftInt8)
}
MODES = ("local_updates", "gradients")


class AveragingFailed(RuntimeError):
    """``max_failed_rounds`` averaging rounds in a row failed or lost parts: the peer is training alone."""


@dataclass
class VolunteerConfig:
    """How one peer joins a hivemind swarm. Every peer of a run uses the same ``run_id``, ``target_batch_size``,
    ``mode``, ``average_state_every`` and ``compression``; the addresses and ``batch_size_per_step`` are per peer."""

    run_id: str
    """The run's name on the DHT: peers with the same ``run_id`` train together (a prefix of every DHT key)."""
    target_batch_size: int
    """Samples the whole swarm processes per epoch (one optimizer step of the swarm, one scheduler step)."""
    batch_size_per_step: int
    """Samples this peer processes per call to ``step`` (its per-device batch times its accumulation steps)."""
    initial_peers: Sequence[str] = ()
    """Multiaddresses of peers already in the swarm (``/ip4/1.2.3.4/tcp/31337/p2p/Qm...``, printed by the first
    peer); empty for the first peer."""
    host_maddrs: Sequence[str] = ("/ip4/0.0.0.0/tcp/0",)
    """Where this peer listens; ``/ip4/127.0.0.1/tcp/0`` keeps it on this machine."""
    announce_maddrs: Sequence[str] = ()
    """The addresses other peers are told to use (a public IP behind NAT); empty: the listening ones."""
    use_relay: bool = True
    """Reach peers behind NAT through relays (libp2p circuit relay); off keeps all traffic direct."""
    use_auto_relay: bool = False
    """Look for relays automatically (needs public peers)."""
    client_mode: bool = False
    """Accept no incoming connections (a peer behind a firewall): it sends and receives through others."""
    mode: str = "local_updates"
    """``local_updates``: own optimizer step on every batch, state averaged every ``average_state_every`` epochs.
    ``gradients``: gradients averaged every epoch, one synchronous optimizer step (hivemind's default)."""
    average_state_every: int = 1
    """Average parameters every N epochs (both modes; in ``gradients`` mode it re-aligns peers
    whose local fallbacks made them drift)."""
    matchmaking_time: float = 5.0
    """Seconds a peer waits for others to form an averaging group (3-5 on one machine or a LAN, 10-15 over the
    internet)."""
    averaging_timeout: float = 60.0
    """Seconds before an averaging round is given up (it then counts as failed)."""
    compression: str = "fp16"
    """The codec of every averaging message (a key of :data:`CODECS`; ``int8`` is gsoft's, the others hivemind's)."""
    powersgd_rank: int = 0
    """``gradients`` mode: average gradients with hivemind's PowerSGD of this rank (0: plain averaging)."""
    max_failed_rounds: int = 5
    """Stop with :class:`AveragingFailed` after this many failed or partial averaging rounds in a row."""
    min_peers: int = 1
    """Wait before the first step until this many peers (this one included) report progress in the swarm, so that
    peers started together also begin together (:func:`wait_for_peers`)."""
    peer_wait_timeout: float = 600.0
    """Seconds :func:`wait_for_peers` waits before giving up with an error."""

    def __post_init__(self) -> None:
        if not self.run_id or not isinstance(self.run_id, str):
            raise ValueError(f"run_id {self.run_id!r}: give the swarm a non-empty name (every peer uses the same).")
        for name in ("target_batch_size", "batch_size_per_step", "average_state_every", "max_failed_rounds",
                     "min_peers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r} must be a positive integer.")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}.")
        if self.compression not in CODECS:
            raise ValueError(f"compression {self.compression!r}: choose one of {', '.join(CODECS)} (hivemind's "
                             "codecs and gsoft's int8; gsoft's Top-K, sign and Rand-K need error feedback, which "
                             "hivemind's regrouping all-reduce cannot keep).")
        if isinstance(self.powersgd_rank, bool) or not isinstance(self.powersgd_rank, int) or self.powersgd_rank < 0:
            raise ValueError(f"powersgd_rank {self.powersgd_rank!r} must be a non-negative integer (0: off).")
        if self.powersgd_rank and self.mode != "gradients":
            raise ValueError(f"powersgd_rank {self.powersgd_rank} compresses averaged gradients: it needs mode "
                             "'gradients' (local_updates averages parameters).")
        for name in ("matchmaking_time", "averaging_timeout", "peer_wait_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} {value!r} must be a positive number of seconds.")
        if self.averaging_timeout <= self.matchmaking_time:
            raise ValueError(f"averaging_timeout {self.averaging_timeout} must exceed matchmaking_time "
                             f"{self.matchmaking_time}: a round first looks for a group, then averages.")
        for name in ("initial_peers", "host_maddrs", "announce_maddrs"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} {value!r}: give a list of multiaddresses, not one string.")
            setattr(self, name, tuple(value))
        if not self.host_maddrs:
            raise ValueError("host_maddrs is empty: give at least one address to listen on, e.g. "
                             "/ip4/0.0.0.0/tcp/0.")


def start_dht(config: VolunteerConfig) -> Any:
    """Join (or, with no ``initial_peers``, start) the swarm's DHT; the public IPFS bootstrap stays off."""
    hivemind = _import_hivemind()
    try:
        return hivemind.DHT(start=True, initial_peers=list(config.initial_peers),
                            host_maddrs=list(config.host_maddrs), announce_maddrs=list(config.announce_maddrs) or None,
                            use_relay=config.use_relay, use_auto_relay=config.use_auto_relay, use_ipfs=False,
                            client_mode=config.client_mode)
    except hivemind.p2p.P2PDaemonError as exc:
        raise OSError(f"cannot join the swarm (initial_peers {list(config.initial_peers)}, host_maddrs "
                      f"{list(config.host_maddrs)}): {exc}. Check that an initial peer is running and reachable at "
                      "the address it printed.") from exc


def visible_addresses(dht: Any) -> list[str]:
    """The multiaddresses other peers pass as ``initial_peers`` to join through this one."""
    return [str(address) for address in dht.get_visible_maddrs()]


def wait_for_peers(dht: Any, config: VolunteerConfig) -> int:
    """Announce this peer under ``<run_id>_gsoft_peers`` on the DHT and block until ``config.min_peers`` peers have
    (hivemind's progress tracker lists a peer only after its first samples); the number seen. Raises TimeoutError
    after ``config.peer_wait_timeout`` seconds."""
    from hivemind.utils import get_dht_time

    key, me = f"{config.run_id}_gsoft_peers", str(dht.peer_id)
    deadline = time.monotonic() + config.peer_wait_timeout
    while True:
        dht.store(key, subkey=me, value=True, expiration_time=get_dht_time() + 30.0)
        found = dht.get(key, latest=True)
        peers = len(found.value) if found is not None and isinstance(found.value, dict) else 0
        if peers >= config.min_peers:
            return peers
        if time.monotonic() > deadline:
            raise TimeoutError(f"min_peers {config.min_peers}: only {peers} peer(s) of run {config.run_id!r} appeared "
                               f"within {config.peer_wait_timeout:g} s; start the other peers with --initial_peers "
                               "set to this peer's address, or lower --min_peers.")
        time.sleep(0.5)


# ---- codecs and traffic ----------------------------------------------------------------------------------------------
class TrafficCounter:
    """Bytes of tensor messages this peer sent and received, counted in hivemind's averaging processes (forked from
    this one) and read here: shared memory, created before the averagers start."""

    def __init__(self) -> None:
        self._sent = multiprocessing.Value(ctypes.c_longlong, 0)
        self._received = multiprocessing.Value(ctypes.c_longlong, 0)

    def add(self, sent: int = 0, received: int = 0) -> None:
        for value, amount in ((self._sent, sent), (self._received, received)):
            if amount:
                with value.get_lock():
                    value.value += amount

    @property
    def sent(self) -> int:
        return int(self._sent.value)

    @property
    def received(self) -> int:
        return int(self._received.value)


#: The process-wide counter of the codecs :func:`install_codecs` registers (hivemind's registry is process-wide).
TRAFFIC: Optional[TrafficCounter] = None


def install_codecs() -> TrafficCounter:
    """Check hivemind's codecs, replace a broken 8-bit decoder, and count every message; once per process, before
    any averager starts (they are forked from this process and inherit the registry). Returns the counter."""
    global TRAFFIC
    if TRAFFIC is not None:
        return TRAFFIC
    if multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        raise ValueError(f"multiprocessing start method {multiprocessing.get_start_method()!r}: hivemind's averagers "
                         "must be forked from the training process (the default on Linux); do not set another.")
    _import_hivemind()
    from hivemind.compression import serialization

    counter = TrafficCounter()
    registry = serialization._BASE_COMPRESSION_TYPES
    for name in dict.fromkeys(CODECS.values()):  # each wire format once (int8 and uniform8bit share one)
        codec = registry[name]
        error = _round_trip_error(codec)
        if error is not None:
            fixed = _Fixed8BitDecoder(codec)
            if _round_trip_error(fixed) is not None:
                raise RuntimeError(f"hivemind codec {name} fails a round trip ({error}) and gsoft has no replacement "
                                   f"for it; use another --hivemind_compression ({', '.join(CODECS)}).")
            logger.info("hivemind codec %s fails a round trip here (%s); gsoft decodes its messages instead (same "
                        "wire format)", name, error)
            codec = fixed
        registry[name] = _Counted(codec, counter)
    TRAFFIC = counter
    return counter


def codec(name: str) -> Any:
    """The registered (checked and counted) codec for ``--hivemind_compression name``; after :func:`install_codecs`.

    ``int8`` and ``uniform8bit`` share hivemind's ``UNIFORM_8BIT`` format: choosing one makes this process encode
    that format with it (an averaging round re-encodes averaged parts through the registry, not through the codec it
    was given); decoding is the same for both."""
    from hivemind.compression import serialization

    counted = serialization._BASE_COMPRESSION_TYPES[CODECS[name]]
    if CODECS[name] == "UNIFORM_8BIT":
        decoder = counted.inner.decoder if isinstance(counted.inner, _GsoftInt8) else counted.inner
        counted.inner = _GsoftInt8(decoder) if name == "int8" else decoder
    return counted


def _round_trip_error(codec: Any) -> Optional[str]:
    """None when ``codec`` decodes what it encodes (within 8-bit precision), else what went wrong."""
    from hivemind.compression.base import CompressionInfo

    tensor = torch.linspace(-1.0, 1.0, 1024)
    try:
        out = codec.extract(codec.compress(tensor, CompressionInfo.from_tensor(tensor)))
    except Exception as exc:  # the failure is the answer
        return f"{type(exc).__name__}: {exc}"
    if out.shape != tensor.shape or not torch.isfinite(out).all():
        return f"decoded {tuple(out.shape)} values, not {tuple(tensor.shape)} finite ones"
    error = float((out.float() - tensor).abs().max())
    return None if error < 0.05 else f"largest decoding error {error:.3g}"


class _Counted:
    """A codec that adds the bytes of every message it encodes or decodes to a :class:`TrafficCounter`."""

    def __init__(self, inner: Any, counter: TrafficCounter) -> None:
        self.inner = inner
        self.counter = counter
        self.compression_type = inner.compression_type

    def compress(self, tensor: torch.Tensor, info: Any, allow_inplace: bool = False) -> Any:
        message = self.inner.compress(tensor, info, allow_inplace)
        self.counter.add(sent=len(message.buffer))
        return message

    def extract(self, serialized: Any) -> torch.Tensor:
        self.counter.add(received=len(serialized.buffer))
        return self.inner.extract(serialized)

    def estimate_compression_ratio(self, info: Any) -> float:
        return self.inner.estimate_compression_ratio(info)


class _Fixed8BitDecoder:
    """hivemind's 8-bit quantisation (``Quantization`` subclasses) with its decoder reading the header as numpy 2
    requires; encoding is hivemind's own."""

    def __init__(self, inner: Any) -> None:
        import numpy as np

        if not hasattr(inner, "codebook_dtype"):
            raise RuntimeError(f"hivemind codec {type(inner).__name__} is not an 8-bit quantisation")
        self.inner, self._np = inner, np
        self.compression_type = inner.compression_type

    def compress(self, tensor: torch.Tensor, info: Any, allow_inplace: bool = False) -> Any:
        return self.inner.compress(tensor, info, allow_inplace)

    def extract(self, serialized: Any) -> torch.Tensor:
        np, inner, buffer = self._np, self.inner, serialized.buffer
        codebook_size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=codebook_size, dtype=inner.codebook_dtype)
        quantized = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=inner.indices_dtype)
        indices = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized.size))
        values = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized.dtype))
        return values[indices].requires_grad_(serialized.requires_grad)

    def estimate_compression_ratio(self, info: Any) -> float:
        return self.inner.estimate_compression_ratio(info)


class _GsoftInt8:
    """gsoft's int8 (QSGD: one scale ``max|x| / 127`` per message, unbiased stochastic rounding) in hivemind's
    uniform 8-bit format: a 256-entry codebook ``scale * (k - 127)`` and one uint8 index per value, so any peer's
    ``UNIFORM_8BIT`` decoder reads it. The rounding noise is drawn afresh for every message."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.compression_type = decoder.compression_type

    def compress(self, tensor: torch.Tensor, info: Any, allow_inplace: bool = False) -> Any:
        import numpy as np
        from hivemind.proto import runtime_pb2

        from .compressors import Int8

        flat = tensor.detach().reshape(-1).float().cpu()
        codes, scale = Int8(chunk_size=max(1, flat.numel())).compress(
            flat, private_seed=int(torch.randint(0, 2**62, ()).item()))
        codebook = (scale.float() * torch.arange(-127, 129, dtype=torch.float32)).numpy()
        indices = (codes.to(torch.int16) + 127).to(torch.uint8).numpy()
        return runtime_pb2.Tensor(
            compression=self.compression_type,
            buffer=b"".join((np.int64(codebook.size).tobytes(), codebook.tobytes(), indices.tobytes())),
            size=tensor.shape, dtype=str(tensor.dtype).removeprefix("torch."),
            requires_grad=tensor.requires_grad)

    def extract(self, serialized: Any) -> torch.Tensor:
        return self.decoder.extract(serialized)

    def estimate_compression_ratio(self, info: Any) -> float:
        return self.decoder.estimate_compression_ratio(info)


# ---- averaging rounds ------------------------------------------------------------------------------------------------
@dataclass
class RoundLog:
    """What became of this peer's averaging rounds. Outcomes arrive on hivemind's threads (:meth:`watch`); the
    training thread reads them at every step (:meth:`check`), warns about each failed or partial round and stops the
    run after ``max_failed`` of them in a row."""

    max_failed: int
    succeeded: int = 0
    failed: int = 0
    partial: int = 0
    cancelled: int = 0
    errors: list[str] = field(default_factory=list)
    _partial_events: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seen: tuple[int, int, int] = (0, 0, 0)
    _streak: int = 0

    def __post_init__(self) -> None:
        self._partial_events = multiprocessing.Value(ctypes.c_longlong, 0)

    def watch(self, control: Any, kind: str) -> None:
        """Record the outcome of one round (a hivemind ``StepControl``) when it ends."""
        control.add_done_callback(functools.partial(self._done, kind=kind))

    def _done(self, control: Any, kind: str) -> None:
        with self._lock:
            if control.cancelled():  # hivemind cancels pre-scheduled rounds it does not need
                self.cancelled += 1
                return
            error = control.exception()
            if error is None and control.result() is None:
                error = "no group was formed"
            if error is None:
                self.succeeded += 1
            else:
                self.failed += 1
                self.errors.append(f"{kind}: {error!r}" if not isinstance(error, str) else f"{kind}: {error}")

    def partial_handler(self) -> logging.Handler:
        """A handler for ``hivemind.averaging.partition``: its "received N%" warnings, logged in the averaging
        process when some peers' parts never arrived, count as partial rounds here."""
        events = self._partial_events

        class _Partial(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith(("Averaging: received", "Reducer: received")):
                    with events.get_lock():
                        events.value += 1

        return _Partial(level=logging.WARNING)

    def check(self) -> None:
        """Warn about every round that failed or lost parts since the last check; raise :class:`AveragingFailed`
        after ``max_failed`` such rounds in a row."""
        with self._lock:
            succeeded, failed, events = self.succeeded, self.failed, int(self._partial_events.value)
            new_errors = self.errors[len(self.errors) - (failed - self._seen[1]):] if failed > self._seen[1] else []
        seen_ok, seen_failed, seen_events = self._seen
        self._seen = (succeeded, failed, events)
        if events > seen_events:
            self.partial += 1
            logger.warning("an averaging round lost parts: some peers' contributions never arrived (a peer left "
                           "mid-round, or sent what this peer cannot decode); this peer keeps its own values for them "
                           "(%d partial and %d failed rounds so far)", self.partial, failed)
        for error in new_errors:
            logger.warning("averaging round failed (%s); this peer continues with its local state (%d failed of %d "
                           "rounds so far)", error, failed, failed + succeeded)
        bad = (failed - seen_failed) + (events > seen_events)
        if bad:
            self._streak += bad
        elif succeeded > seen_ok:
            self._streak = 0
        if self._streak >= self.max_failed:
            raise AveragingFailed(
                f"{self._streak} averaging rounds in a row failed or lost parts (last: "
                f"{new_errors[-1] if new_errors else 'parts of a round never arrived'}): this peer is training alone. "
                "Check that the other peers are running and reachable, raise --averaging_timeout or "
                "--matchmaking_time on slow links, or raise --max_failed_rounds.")

    def summary(self) -> dict[str, int]:
        return {"succeeded": self.succeeded, "failed": self.failed, "partial": self.partial,
                "cancelled": self.cancelled}


def _accounted(averager_class: type) -> type:
    """``averager_class`` with every round it starts watched by its ``rounds`` log: the override sits between
    hivemind's averager subclasses and ``DecentralizedAverager.step``, which every round goes through."""
    return _ACCOUNTED.setdefault(averager_class, type(f"Accounted{averager_class.__name__}",
                                                      (averager_class, _accounting_mixin()), {}))


_ACCOUNTED: dict[type, type] = {}


@functools.lru_cache(maxsize=None)
def _accounting_mixin() -> type:
    from hivemind.averaging import DecentralizedAverager

    class RoundAccounting(DecentralizedAverager):
        rounds: Optional[RoundLog] = None
        round_kind = "averaging"

        def step(self, *args: Any, wait: bool = True, **kwargs: Any) -> Any:
            control = super().step(*args, wait=False, **kwargs)
            if self.rounds is not None:
                self.rounds.watch(control, self.round_kind)
            return control.result() if wait else control

    return RoundAccounting


def _import_hivemind() -> Any:
    try:
        import hivemind
    except ImportError as exc:
        raise ImportError("--backend hivemind needs hivemind: pip install 'gsoft[hivemind]'") from exc
    return hivemind


def make_optimizer(
    config: VolunteerConfig,
    dht: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Optional[Any] = None,
    *,
    verbose: bool = False,
) -> Any:
    """A hivemind optimizer around ``optimizer`` (and its ``scheduler``, which then steps once per swarm epoch) whose
    averaging rounds are accounted for (its ``rounds``, a :class:`RoundLog`, and ``traffic``), configured from
    ``config``. Call its ``finish()`` at the end of training and ``shutdown()`` to leave the swarm."""
    install_codecs()
    wire = codec(config.compression)
    options: dict[str, Any] = {}
    if config.mode == "gradients":
        options["grad_compression"] = wire
        if config.powersgd_rank:
            from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager

            options["grad_averager_factory"] = functools.partial(_accounted(PowerSGDGradientAverager),
                                                                 averager_rank=config.powersgd_rank)
    return _optimizer_class()(
        config=config, dht=dht, run_id=config.run_id, target_batch_size=config.target_batch_size,
        batch_size_per_step=config.batch_size_per_step, optimizer=optimizer, scheduler=scheduler,
        matchmaking_time=config.matchmaking_time, averaging_timeout=config.averaging_timeout,
        average_state_every=config.average_state_every, use_local_updates=config.mode == "local_updates",
        client_mode=config.client_mode, state_averaging_compression=wire, load_state_compression=wire,
        verbose=verbose, **options)


@functools.lru_cache(maxsize=None)
def _optimizer_class() -> type:
    hivemind = _import_hivemind()
    from hivemind.optim.grad_averager import GradientAverager

    class _Optimizer(hivemind.Optimizer):
        """hivemind.Optimizer whose averaging rounds are accounted for (:class:`RoundLog`)."""

        def __init__(self, *, config: VolunteerConfig, **kwargs: Any) -> None:
            self.rounds = RoundLog(max_failed=config.max_failed_rounds)
            self.traffic = install_codecs()
            self._partial_handler = self.rounds.partial_handler()
            logging.getLogger("hivemind.averaging.partition").addHandler(self._partial_handler)
            if kwargs.get("use_local_updates") is False and "grad_averager_factory" not in kwargs:
                kwargs["grad_averager_factory"] = _accounted(GradientAverager)
            super().__init__(**kwargs)

        def _make_state_averager(self, **kwargs: Any) -> Any:
            averager = super()._make_state_averager(**kwargs)
            averager.__class__ = _accounted(type(averager))  # same object, with rounds watched
            averager.rounds, averager.round_kind = self.rounds, "state averaging"
            return averager

        def _make_gradient_averager(self, factory: Any, **kwargs: Any) -> Any:
            averager = super()._make_gradient_averager(factory, **kwargs)
            averager.rounds, averager.round_kind = self.rounds, "gradient averaging"
            return averager

        def step(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().step(*args, **kwargs)
            self.rounds.check()
            return loss

        def finish(self) -> None:
            """Wait for a background averaging round to end and apply it, then check every round's outcome."""
            self.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
            self.rounds.check()

        def shutdown(self) -> None:
            logging.getLogger("hivemind.averaging.partition").removeHandler(self._partial_handler)
            super().shutdown()

    return _Optimizer


__all__ = [
    "AveragingFailed",
    "CODECS",
    "MODES",
    "RoundLog",
    "TrafficCounter",
    "VolunteerConfig",
    "install_codecs",
    "make_optimizer",
    "start_dht",
    "visible_addresses",
    "wait_for_peers",
]
