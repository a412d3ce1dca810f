"""``--backend hivemind``: a recipe run as one peer of a hivemind swarm (``gsoft.distributed.volunteer``).

Each peer is one process (``python recipes/roberta_glue.py ...``; no ``accelerate launch --multi_gpu``). The first
peer starts the swarm and writes the addresses others join through to ``<output_dir>/peer_addresses.json`` (and its
log); every other peer passes one of them as ``--initial_peers``. All peers use the same ``--run_id`` and training
options. What changes from a data-parallel run:

- A step is a *swarm* step (hivemind's epoch): ``--target_batch_size`` samples processed by all peers together.
  ``--max_steps`` counts those; by default the run takes ``--num_train_epochs`` passes over the training set's worth
  of samples in total, whoever processed them. The learning-rate schedule follows the swarm's step, so a peer that
  joins late gets the current learning rate, and (hivemind) the current parameters and optimizer state.
- Each peer draws its own data order (its seed mixed with its peer id), so peers do not repeat each other's batches.
- Evaluation, checkpoints and the final save happen on every peer at its swarm steps, after the latest averaging
  round has been applied; whichever peers reach the last step save the adapter. A peer leaves with
  ``--stop_after_steps`` (a checkpoint, then a goodbye to the swarm), or by dying: the others carry on.
- results.json reports the bytes of the tensor messages this peer sent and received, and every averaging round's
  outcome (failed and partial rounds are warned about as they happen).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from gsoft.distributed.volunteer import (
    CODECS,
    MODES,
    VolunteerConfig,
    make_optimizer,
    start_dht,
    visible_addresses,
    wait_for_peers,
)

from .loop import TrainLoop, Trainables
from .run import atomic_write_json

logger = logging.getLogger(__name__)

BACKENDS = ("accelerate", "hivemind")
#: Written by every peer into its output directory: the multiaddresses other peers pass as ``--initial_peers``.
PEER_ADDRESSES = "peer_addresses.json"


@dataclass
class VolunteerArgs:
    """Where the run's processes come from: accelerate's data-parallel launch, or peers of a hivemind swarm."""

    backend: str = field(
        default="accelerate",
        metadata={"help": f"{' | '.join(BACKENDS)}: accelerate = one run of 1..N data-parallel processes "
                          "(accelerate launch / torchrun); hivemind = this process is one peer of a swarm over the "
                          "internet (pip install 'gsoft[hivemind]'), peers join and leave at any time.",
                  "choices": BACKENDS},
    )
    initial_peers: list[str] = field(
        default_factory=list,
        metadata={"help": "hivemind: multiaddresses of running peers to join through (the first peer prints them "
                          "and writes them to <output_dir>/peer_addresses.json); empty = start a new swarm."},
    )
    run_id: Optional[str] = field(
        default=None,
        metadata={"help": "hivemind: the swarm's name; every peer of a run passes the same one (required)."},
    )
    host_maddrs: list[str] = field(
        default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"],
        metadata={"help": "hivemind: where this peer listens; [/ip4/127.0.0.1/tcp/0] keeps it on this machine."},
    )
    announce_maddrs: list[str] = field(
        default_factory=list,
        metadata={"help": "hivemind: the addresses other peers should use (e.g. a public IP behind NAT); empty = "
                          "the listening ones."},
    )
    use_relay: bool = field(
        default=True,
        metadata={"help": "hivemind: reach peers behind NAT through libp2p relays; false keeps traffic direct."},
    )
    client_mode: bool = field(
        default=False,
        metadata={"help": "hivemind: accept no incoming connections (a peer behind a firewall)."},
    )
    target_batch_size: Optional[int] = field(
        default=None,
        metadata={"help": "hivemind: samples all peers process per swarm step (an optimizer step of the swarm and "
                          "of the learning-rate schedule); null = 3 x --per_device_train_batch_size.", "min": 1},
    )
    hivemind_mode: str = field(
        default="local_updates",
        metadata={"help": f"{' | '.join(MODES)}: local_updates = each peer steps AdamW on its own batches and the "
                          "peers average their parameters every --average_state_every swarm steps "
                          "(local steps, like --compress updates); gradients = gradients averaged every swarm step, "
                          "one synchronous AdamW step (large-batch training).", "choices": MODES},
    )
    average_state_every: int = field(
        default=1,
        metadata={"help": "hivemind: average the peers' parameters every N swarm steps.", "min": 1},
    )
    matchmaking_time: float = field(
        default=5.0,
        metadata={"help": "hivemind: seconds to wait for peers to form an averaging group (3-5 on a LAN, 10-15 "
                          "over the internet).", "above": 0},
    )
    averaging_timeout: float = field(
        default=60.0,
        metadata={"help": "hivemind: seconds before an averaging round is given up (it counts as failed).",
                  "above": 0},
    )
    hivemind_compression: str = field(
        default="fp16",
        metadata={"help": f"hivemind: codec of every averaging message: {', '.join(CODECS)} (hivemind's own, and "
                          "gsoft's unbiased int8 in hivemind's uniform 8-bit format; sign, topk and randk need error "
                          "feedback, which hivemind's regrouping all-reduce cannot keep).", "choices": tuple(CODECS)},
    )
    hivemind_powersgd_rank: int = field(
        default=0,
        metadata={"help": "hivemind, --hivemind_mode gradients: average gradients with hivemind's PowerSGD of this "
                          "rank; 0 = off.", "min": 0},
    )
    min_peers: int = field(
        default=1,
        metadata={"help": "hivemind: wait before the first step until this many peers (this one included) are in "
                          "the swarm, so that peers started together begin together.", "min": 1},
    )
    peer_wait_timeout: float = field(
        default=600.0,
        metadata={"help": "hivemind: seconds to wait for --min_peers before giving up.", "above": 0},
    )
    max_failed_rounds: int = field(
        default=5,
        metadata={"help": "hivemind: stop after this many failed or partial averaging rounds in a row (each one is "
                          "warned about).", "min": 1},
    )


def volunteer_config(args: Any) -> Optional[VolunteerConfig]:
    """The peer's :class:`VolunteerConfig` for ``--backend hivemind`` (None for accelerate); making it checks the
    options, and a recipe calls it from its ``__post_init__`` so that bad ones fail before any work."""
    if args.backend != "hivemind":
        return None
    if args.run_id is None:
        raise ValueError("--backend hivemind needs --run_id NAME, the same on every peer of the run.")
    if getattr(args, "grad_compression", "none") != "none" or getattr(args, "local_steps", 1) != 1:
        raise ValueError(f"--grad_compression {args.grad_compression} --local_steps {args.local_steps}: these compress "
                         "what data-parallel processes exchange; with --backend hivemind use --hivemind_compression "
                         "and --hivemind_mode local_updates --average_state_every N instead.")
    if args.gradient_accumulation_steps != 1:
        raise ValueError(f"--gradient_accumulation_steps {args.gradient_accumulation_steps}: with --backend hivemind "
                         "the swarm accumulates --target_batch_size samples itself; raise --target_batch_size "
                         "instead.")
    if args.mixed_precision == "fp16":
        raise ValueError("--mixed_precision fp16 with --backend hivemind: hivemind's optimizer needs its own gradient "
                         "scaler; train in bf16 or fp32.")
    batch = args.per_device_train_batch_size
    try:
        return VolunteerConfig(
            run_id=args.run_id, target_batch_size=args.target_batch_size or 3 * batch, batch_size_per_step=batch,
            initial_peers=args.initial_peers, host_maddrs=args.host_maddrs, announce_maddrs=args.announce_maddrs,
            use_relay=args.use_relay, client_mode=args.client_mode, mode=args.hivemind_mode,
            average_state_every=args.average_state_every, matchmaking_time=args.matchmaking_time,
            averaging_timeout=args.averaging_timeout, compression=args.hivemind_compression,
            powersgd_rank=args.hivemind_powersgd_rank, max_failed_rounds=args.max_failed_rounds,
            min_peers=args.min_peers, peer_wait_timeout=args.peer_wait_timeout,
        )
    except ValueError as exc:
        raise ValueError(f"--backend hivemind: {exc}") from exc


class VolunteerLoop(TrainLoop):
    """The training loop of one hivemind peer: the shared loop with hivemind's optimizer, swarm steps as the run's
    steps, and the swarm left at the end (or on an error)."""

    dht: Any = None

    @property
    def volunteer(self) -> VolunteerConfig:
        config = self.settings.volunteer
        if config is None:
            raise ValueError("VolunteerLoop needs LoopSettings.volunteer")
        return config

    def run(self) -> Optional[dict[str, Any]]:
        try:
            return super().run()
        finally:
            self._leave()

    def _prepare(self, trainables: Trainables) -> None:
        s, acc, config = self.settings, self.accelerator, self.volunteer
        if acc.num_processes != 1:
            raise ValueError(f"--backend hivemind runs one process per peer, not {acc.num_processes}: start each peer "
                             "with python (or accelerate launch --num_processes 1).")
        names = list(trainables.models)
        prepared = acc.prepare(*trainables.models.values(), trainables.train_loader)
        self.models = dict(zip(names, prepared[: len(names)]))
        self.train_loader = prepared[len(names)]
        passes = len(self.train_loader) * config.batch_size_per_step / config.target_batch_size  # swarm steps
        self.steps_per_epoch = max(1, round(passes))
        self.max_steps = s.max_steps or max(1, math.ceil(s.num_epochs * passes))
        self.scheduler = self.recipe.scheduler(self, trainables.optimizer, self.max_steps)
        self.dht = start_dht(config)
        addresses = visible_addresses(self.dht)
        if acc.is_main_process:
            atomic_write_json(self.output_dir / PEER_ADDRESSES, {"run_id": config.run_id,
                                                                 "peer_id": str(self.dht.peer_id),
                                                                 "addresses": addresses})
        logger.info("peer %s of swarm %r; others join with --initial_peers %s", self.dht.peer_id, config.run_id,
                    " ".join(addresses))
        self.optimizer = make_optimizer(config, self.dht, trainables.optimizer, self.scheduler)
        acc.register_for_checkpointing(self.optimizer)  # parameters' optimizer state and the swarm step
        if config.min_peers > 1:
            logger.info("waiting for %d peers of swarm %r (--min_peers)", config.min_peers, config.run_id)
            logger.info("%d peers in the swarm: starting", wait_for_peers(self.dht, config))
        digest = hashlib.sha256(str(self.dht.peer_id).encode()).digest()
        self._data_offset = int.from_bytes(digest[:4], "big") % (1 << 30)

    def _resume_position(self) -> tuple[int, int]:
        """A resumed peer starts a fresh pass over its data: the swarm, not this peer, decides what has been trained
        on."""
        return 0, 0

    def _data_epochs(self) -> Iterable[int]:
        return itertools.count(self._start_epoch)

    def _batches(self, epoch: int) -> Any:
        """This peer's own data order (its seed mixed with its peer id)."""
        self.train_loader.set_epoch(self._data_offset + epoch)
        return self.train_loader

    def _advance(self) -> int:
        """The swarm steps completed since the last call (hivemind steps the learning-rate schedule itself)."""
        return max(0, min(self.optimizer.local_epoch, self.max_steps) - self.step)

    def _synchronize(self) -> None:
        """Apply the latest background averaging round before an evaluation or the save."""
        self.optimizer.finish()

    def _bytes_sent(self) -> int:
        return self.optimizer.traffic.sent

    def _communication_results(self) -> dict[str, Any]:
        config, optimizer = self.volunteer, self.optimizer
        return {
            "comm_bytes_sent": optimizer.traffic.sent,
            "comm_bytes_received": optimizer.traffic.received,
            "comm_bytes_uncompressed": 0,
            "compression": {"method": f"hivemind:{config.compression}", "mode": config.mode,
                            "target_batch_size": config.target_batch_size,
                            "average_state_every": config.average_state_every, "world_size": 1},
            "averaging_rounds": optimizer.rounds.summary(),
            "swarm_peers_at_end": int(optimizer.tracker.global_progress.num_peers),
        }

    def _communication_line(self) -> Optional[str]:
        optimizer, rounds = self.optimizer, self.optimizer.rounds
        return (f"hivemind ({self.volunteer.compression}, {self.volunteer.mode}): {optimizer.traffic.sent:,} bytes "
                f"sent and {optimizer.traffic.received:,} received by this peer; averaging rounds: "
                f"{rounds.succeeded} succeeded, {rounds.failed} failed, {rounds.partial} partial")

    def _leave(self) -> None:
        """Say goodbye to the swarm: the optimizer's averagers, then the DHT."""
        optimizer, self.optimizer = self.optimizer, None
        if optimizer is not None and hasattr(optimizer, "rounds"):
            optimizer.shutdown()
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None


def loop_class(args: Any) -> type[TrainLoop]:
    """The loop of ``--backend``."""
    return VolunteerLoop if args.backend == "hivemind" else TrainLoop


__all__ = ["BACKENDS", "PEER_ADDRESSES", "VolunteerArgs", "VolunteerLoop", "loop_class", "volunteer_config"]
