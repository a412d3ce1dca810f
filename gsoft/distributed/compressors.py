"""Gradient compressors: pure functions of a flat tensor and seeds, with an exact payload size.

Nothing here knows about DDP or process groups, so the same objects serve the DDP communication hooks
(:mod:`gsoft.distributed.hooks`), the in-process simulations of the tests, and any other transport. A payload is a tuple of tensors whose dtypes and lengths depend only on the
input length (:meth:`Compressor.layout`); that is what lets every worker pre-size the receive buffers of an
``all_gather`` and what makes the byte count a formula instead of a measurement.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Sequence

import torch

Payload = tuple[torch.Tensor, ...]
Layout = tuple[tuple[torch.dtype, int], ...]


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    return gen


def _n_chunks(numel: int, chunk_size: int) -> int:
    return max(1, math.ceil(numel / chunk_size))


def _chunked(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``x`` zero-padded to whole chunks, shaped ``(n_chunks, chunk_size)``."""
    n = _n_chunks(x.numel(), chunk_size)
    padded = x.new_zeros(n * chunk_size)
    padded[: x.numel()] = x
    return padded.view(n, chunk_size)


def _keep_count(numel: int, ratio: float) -> int:
    return min(numel, max(1, math.ceil(ratio * numel)))


def check_ratio(ratio: float) -> None:
    """``compression_ratio``: the fraction of coordinates a selecting compressor sends, in (0, 1]."""
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
        raise ValueError(f"compression_ratio must be in (0, 1] (the fraction of coordinates sent), got {ratio!r}; "
                         f"e.g. 0.01 sends 1% of them.")


def _check_chunk_size(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1 (values per scale), got {chunk_size!r}")


class Compressor:
    """``compress(x) -> payload``, ``decompress(payload) -> x̂``; ``x`` is flat float32.

    ``shared_seed`` is equal on every worker for the same tensor and step (it picks Rand-K's coordinates, so no
    indices travel); ``private_seed`` differs per worker (stochastic rounding). ``summable`` compressors have
    a one-tensor payload that is linear in what it decodes to, with the same support on every worker, so a
    transport may add payloads (``all_reduce``) instead of gathering them.
    """

    name: ClassVar[str] = ""
    summable: ClassVar[bool] = False
    #: True when ``decompress(compress(x))`` is not ``x`` in expectation: such a compressor needs error feedback
    biased: ClassVar[bool] = False
    #: True when the payload length depends on the data (``layout`` is then the largest possible payload)
    variable_size: ClassVar[bool] = False
    #: True when selection or scales should be per parameter tensor (see :class:`PerTensor`)
    per_tensor: ClassVar[bool] = True

    def layout(self, numel: int) -> Layout:
        raise NotImplementedError

    def compress(self, x: torch.Tensor, *, shared_seed: int = 0, private_seed: int = 0) -> Payload:
        raise NotImplementedError

    def decompress(self, payload: Payload, numel: int, *, shared_seed: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def payload_bytes(self, numel: int) -> int:
        """Exact size of one worker's payload for ``numel`` values (what one message carries)."""
        return sum(count * torch.empty((), dtype=dtype).element_size() for dtype, count in self.layout(numel))

    def describe(self) -> dict:
        return {"name": self.name}


@dataclass
class Identity(Compressor):
    """fp32 as is: the uncompressed baseline, sent through the same code path as the compressors."""

    name: ClassVar[str] = "none"
    summable: ClassVar[bool] = True
    per_tensor: ClassVar[bool] = False  # elementwise: nothing to gain from splitting

    def layout(self, numel: int) -> Layout:
        return ((torch.float32, numel),)

    def compress(self, x, *, shared_seed=0, private_seed=0):
        return (x.float(),)

    def decompress(self, payload, numel, *, shared_seed=0):
        return payload[0].float()


#: The half-precision casts by method name.
CAST_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Cast(Compressor):
    """Half-precision values (``fp16`` or ``bf16``); summed in that precision by ``all_reduce``."""

    dtype: torch.dtype = torch.float16
    name: ClassVar[str] = "cast"
    summable: ClassVar[bool] = True
    per_tensor: ClassVar[bool] = False  # elementwise: nothing to gain from splitting

    def layout(self, numel: int) -> Layout:
        return ((self.dtype, numel),)

    def compress(self, x, *, shared_seed=0, private_seed=0):
        return (x.to(self.dtype),)

    def decompress(self, payload, numel, *, shared_seed=0):
        return payload[0].float()

    def describe(self) -> dict:
        names = {dtype: name for name, dtype in CAST_DTYPES.items()}
        return {"name": names.get(self.dtype, str(self.dtype))}


@dataclass
class Int8(Compressor):
    """QSGD-style int8: per chunk, ``scale = max|x| / 127`` and stochastic rounding of ``x / scale`` (unbiased).

    Payload: ``numel`` int8 codes, then one float32 scale per ``chunk_size`` values.
    """

    chunk_size: int = 1024
    name: ClassVar[str] = "int8"

    def __post_init__(self) -> None:
        _check_chunk_size(self.chunk_size)

    def layout(self, numel: int) -> Layout:
        return ((torch.int8, numel), (torch.float32, _n_chunks(numel, self.chunk_size)))

    def compress(self, x, *, shared_seed=0, private_seed=0):
        chunks = _chunked(x.float(), self.chunk_size)
        scale = chunks.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        noise = torch.rand(chunks.shape, generator=_generator(private_seed, x.device), device=x.device)
        codes = torch.floor(chunks / safe[:, None] + noise).clamp_(-127, 127).to(torch.int8)
        return codes.view(-1)[: x.numel()], scale

    def decompress(self, payload, numel, *, shared_seed=0):
        codes, scale = payload
        chunks = _chunked(codes.float(), self.chunk_size) * scale[:, None]
        return chunks.view(-1)[:numel]

    def describe(self) -> dict:
        return {"name": self.name, "chunk_size": self.chunk_size}


@dataclass
class Sign(Compressor):
    """1-bit sign with a scale (signSGD / 1-bit Adam style): ``mean|x|`` per chunk times ``sign(x)``.

    Payload: the signs packed 8 per byte, then one float32 scale per ``chunk_size`` values. Biased: use it with
    error feedback.
    """

    chunk_size: int = 1024
    name: ClassVar[str] = "sign"
    biased: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_chunk_size(self.chunk_size)

    def layout(self, numel: int) -> Layout:
        return ((torch.uint8, math.ceil(numel / 8)), (torch.float32, _n_chunks(numel, self.chunk_size)))

    def compress(self, x, *, shared_seed=0, private_seed=0):
        x = x.float()
        scale = _chunked(x.abs(), self.chunk_size).sum(dim=1)
        counts = torch.full_like(scale, float(self.chunk_size))
        counts[-1] = x.numel() - (scale.numel() - 1) * self.chunk_size
        bits = torch.zeros(math.ceil(x.numel() / 8) * 8, dtype=torch.uint8, device=x.device)
        bits[: x.numel()] = (x >= 0).to(torch.uint8)
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=x.device)
        packed = (bits.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
        return packed, scale / counts

    def decompress(self, payload, numel, *, shared_seed=0):
        packed, scale = payload
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = ((packed[:, None] >> shifts) & 1).view(-1)[:numel].float()
        signs = bits * 2.0 - 1.0
        return (_chunked(signs, self.chunk_size) * scale[:, None]).view(-1)[:numel]

    def describe(self) -> dict:
        return {"name": self.name, "chunk_size": self.chunk_size}


@dataclass
class TopK(Compressor):
    """The ``ceil(ratio * numel)`` largest-magnitude values with their int32 positions. Biased: use error feedback.

    Payload: ``k`` float32 values, then ``k`` int32 indices (8 bytes per kept value).
    """

    ratio: float = 0.01
    name: ClassVar[str] = "topk"
    biased: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_ratio(self.ratio)

    def layout(self, numel: int) -> Layout:
        k = _keep_count(numel, self.ratio)
        return ((torch.float32, k), (torch.int32, k))

    def compress(self, x, *, shared_seed=0, private_seed=0):
        x = x.float()
        k = _keep_count(x.numel(), self.ratio)
        index = torch.topk(x.abs(), k, sorted=False).indices
        return x[index], index.to(torch.int32)

    def decompress(self, payload, numel, *, shared_seed=0):
        values, index = payload
        out = values.new_zeros(numel)
        out[index.long()] = values
        return out

    def describe(self) -> dict:
        return {"name": self.name, "ratio": self.ratio}


@dataclass
class RandK(Compressor):
    """``k`` coordinates drawn from the shared seed, so every worker picks the same ones and no index is sent.

    Payload: ``k`` float32 values; payloads of different workers add up (``all_reduce``). Without ``rescale`` the
    result is the contractive (biased) version meant for error feedback; ``rescale=True`` multiplies by
    ``numel / k`` for an unbiased estimate (with ``numel / k`` times the variance).
    """

    ratio: float = 0.01
    rescale: bool = False
    name: ClassVar[str] = "randk"
    summable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        self._draws: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def layout(self, numel: int) -> Layout:
        return ((torch.float32, _keep_count(numel, self.ratio)),)

    @property
    def biased(self) -> bool:  # type: ignore[override]
        """Contractive without ``rescale`` (meant for error feedback), unbiased with it."""
        return not self.rescale

    def indices(self, numel: int, shared_seed: int, device: torch.device) -> torch.Tensor:
        # one round asks for the same draw up to three times per tensor (compress, the error-feedback decode, the
        # decode of the sum) and PerTensor interleaves tensors, so keep this round's draws (seeds change per round)
        key = (numel, shared_seed, device)
        if key not in self._draws:
            if len(self._draws) >= 1024:  # earlier rounds' draws: bounded memory
                self._draws.clear()
            # drawn on the tensor's device (no host round trip): equal on every process of one device type
            perm = torch.randperm(numel, generator=_generator(shared_seed, device), device=device)
            self._draws[key] = perm[: _keep_count(numel, self.ratio)]
        return self._draws[key]

    def compress(self, x, *, shared_seed=0, private_seed=0):
        index = self.indices(x.numel(), shared_seed, x.device)
        values = x.float()[index]
        if self.rescale:
            values = values * (x.numel() / index.numel())
        return (values,)

    def decompress(self, payload, numel, *, shared_seed=0):
        (values,) = payload
        out = values.new_zeros(numel)
        out[self.indices(numel, shared_seed, values.device)] = values
        return out

    def describe(self) -> dict:
        return {"name": self.name, "ratio": self.ratio, "rescale": self.rescale}


@dataclass
class Significant(Compressor):
    """GD-SEC's selection: every component whose magnitude exceeds ``cutoff``, with its int32 position, and no cap on
    how many. A zero vector (nothing changed) sends nothing.

    ``cutoff`` is set before each round by :class:`gsoft.distributed.feedback.GDSECFeedback` from the change of the
    model (GD-SEC's rule, defined there). The payload size varies with the data, so a transport first exchanges the
    counts; :meth:`layout_for` gives the size of a payload of ``count`` components, :meth:`layout` the largest one.
    """

    cutoff: float = 0.0
    name: ClassVar[str] = "significant"
    biased: ClassVar[bool] = True
    variable_size: ClassVar[bool] = True

    def layout(self, numel: int) -> Layout:
        return self.layout_for(numel)

    @staticmethod
    def layout_for(count: int) -> Layout:
        return ((torch.float32, count), (torch.int32, count))

    def compress(self, x, *, shared_seed=0, private_seed=0):
        x = x.float()
        index = torch.nonzero(x.abs() > self.cutoff).view(-1)
        return x[index], index.to(torch.int32)

    decompress = TopK.decompress

    @staticmethod
    def count(payload: Payload) -> int:
        return payload[0].numel()

    @staticmethod
    def pad(payload: Payload, count: int) -> Payload:
        return tuple(torch.cat([t, t.new_zeros(count - t.numel())]) for t in payload)

    def describe(self) -> dict:
        return {"name": self.name, "cutoff": self.cutoff}


def _checked_tensors(sizes: Sequence[int], tensor_ids: Optional[Sequence[int]]) -> tuple[tuple[int, ...],
                                                                                         tuple[int, ...]]:
    """The sizes of the tensors a vector is made of, and their ids (default: their positions), checked."""
    if any(n < 1 for n in sizes):
        raise ValueError(f"tensor sizes must be positive, got {list(sizes)}")
    if tensor_ids is not None and len(tensor_ids) != len(sizes):
        raise ValueError(f"{len(tensor_ids)} tensor ids for {len(sizes)} tensors")
    ids = tuple(int(i) for i in tensor_ids) if tensor_ids is not None else tuple(range(len(sizes)))
    return tuple(int(n) for n in sizes), ids


class PerTensor(Compressor):
    """``base`` applied to each parameter's slice of a flat bucket separately, payloads concatenated slot by slot.

    A bucket mixes tensors whose gradients differ by orders of magnitude (a classifier head's against an adapter's,
    ~200x on the GLUE smoke task): one Top-K over the bucket then sends only the head, and one int8/sign scale per
    chunk drowns the small tensor. Per tensor, every parameter gets ``ceil(ratio * n_i)`` components and its own
    scales (layer-wise selection, as DGC does), and the result does not depend on how DDP groups parameters.
    Variable-size bases add one int32 count per tensor in front.

    ``tensor_ids``: stable integers naming the tensors (a DDP hook passes a hash of each parameter's name). Each
    tensor's seeds are derived from the round's seed and its id rather than its position, so Rand-K's coordinates
    and int8's rounding do not depend on how tensors are grouped: a resumed DDP run starts from DDP's initial
    bucket layout again and still draws what the uninterrupted run drew. Default: the positions.
    """

    def __init__(self, base: Compressor, sizes: Sequence[int], tensor_ids: Optional[Sequence[int]] = None):
        self.base = base
        self.sizes, self.tensor_ids = _checked_tensors(sizes, tensor_ids)
        self.summable, self.biased, self.variable_size = base.summable, base.biased, base.variable_size
        self.name = base.name

    def _slots(self, layouts: Sequence[Layout]) -> Layout:
        return tuple((layouts[0][j][0], sum(layout[j][1] for layout in layouts)) for j in range(len(layouts[0])))

    def layout(self, numel: int) -> Layout:
        if numel != sum(self.sizes):
            raise ValueError(f"a vector of {numel} values does not match tensor sizes summing to {sum(self.sizes)}")
        slots = self._slots([self.base.layout(n) for n in self.sizes])
        return (((torch.int32, len(self.sizes)),) + slots) if self.variable_size else slots

    def layout_for(self, count: int) -> Layout:
        return ((torch.int32, len(self.sizes)),) + self.base.layout_for(count)

    def _seeds(self, seed: int, i: int) -> int:
        return seed * 1_000_003 + self.tensor_ids[i]

    def compress(self, x, *, shared_seed=0, private_seed=0):
        parts = [self.base.compress(piece, shared_seed=self._seeds(shared_seed, i),
                                    private_seed=self._seeds(private_seed, i))
                 for i, piece in enumerate(torch.split(x, self.sizes))]
        slots = tuple(torch.cat([p[j] for p in parts]) for j in range(len(parts[0])))
        if self.variable_size:
            counts = torch.tensor([self.base.count(p) for p in parts], dtype=torch.int32, device=x.device)
            slots = (counts,) + slots
        return slots

    def decompress(self, payload, numel, *, shared_seed=0):
        if self.variable_size:
            counts, payload = payload[0].tolist(), payload[1:]
            layouts = [self.base.layout_for(c) for c in counts]
        else:
            layouts = [self.base.layout(n) for n in self.sizes]
        pieces = [torch.split(slot, [layout[j][1] for layout in layouts]) for j, slot in enumerate(payload)]
        return torch.cat([self.base.decompress(tuple(p[i] for p in pieces), n,
                                               shared_seed=self._seeds(shared_seed, i))
                          for i, n in enumerate(self.sizes)])

    def count(self, payload: Payload) -> int:
        return payload[1].numel()

    def pad(self, payload: Payload, count: int) -> Payload:
        return payload[:1] + self.base.pad(payload[1:], count)

    def describe(self) -> dict:
        return dict(self.base.describe(), per_tensor=True)


def shard_bounds(numel: int, shards: int) -> list[int]:
    """The ``shards + 1`` boundaries of ``shards`` contiguous, balanced shards of a vector of ``numel`` values:
    boundary ``j`` is ``round(j numel / shards)``, wherever it falls (tensors are cut, see :class:`Sharded`).

    Cuts are not aligned to int8's and sign's chunks: a cut inside a chunk gives each side its own scale, so a shard
    payload holds at most one scale (4 bytes, and sign one byte of bit padding) more per cut than the unsharded
    payload, while aligned cuts would leave shards up to ``chunk_size / 2`` values off balance (or empty, for vectors
    of fewer than ``shards`` chunks), and the largest shard is what a process sends ``p - 1`` times in stage 2."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an int >= 1, got {shards!r}")
    return [(2 * j * numel + shards) // (2 * shards) for j in range(shards)] + [numel]  # round(j n / p), halves up


def piece_id(tensor_id: int, offset: int) -> int:
    """The id of the piece of tensor ``tensor_id`` that starts ``offset`` values in: the tensor's own id for a piece
    that starts it (an uncut tensor draws what it draws unsharded), else one derived from both, so two pieces of one
    tensor do not draw the same random numbers."""
    return tensor_id if offset == 0 else zlib.crc32(f"{tensor_id}:{offset}".encode())


class Sharded(Compressor):
    """``base`` on each of ``shards`` contiguous shards of a flat vector (:func:`shard_bounds`) and, within a shard, on
    each tensor piece (:class:`PerTensor`): stage 1 of the two-stage exchange
    (:class:`gsoft.distributed.transport.TwoStageExchange`), where shard ``j`` goes to process ``j``.

    The shards cut the tensors laid end to end in the order of their ids (:attr:`order`), not in the vector's order:
    DDP reorders a bucket's parameters when it rebuilds its buckets (and a resumed run starts from the first order
    again), and the shards, the pieces and their seeds then stay the same. The payload is the shards' payloads one
    after the other, each with ``base``'s slots (:meth:`split` cuts it). A tensor cut by a boundary is compressed as
    two pieces, each with its own seeds (:func:`piece_id`) and, for Top-K, its own ``ceil(ratio * piece)`` values
    and, for int8 and sign, its own chunks: per cut, Top-K sends at most one value (8 bytes) more than unsharded,
    int8 one scale (4 bytes), sign one scale and one byte of bit padding. Error feedback around it covers the whole
    message: its error is the vector minus what all the shards decode to.
    """

    def __init__(self, base: Compressor, sizes: Sequence[int], shards: int,
                 tensor_ids: Optional[Sequence[int]] = None):
        if base.variable_size or base.summable:
            raise ValueError(f"{base.name} payloads are {'variable-size' if base.variable_size else 'summed'}: the "
                             f"two-stage exchange is for fixed-size payloads that cannot be added (int8, sign, topk)")
        self.base = base
        self.sizes, self.tensor_ids = _checked_tensors(sizes, tensor_ids)
        self.biased, self.name = base.biased, base.name
        #: the tensors (their indices in the vector) in the order the shards cut them
        self.order = sorted(range(len(self.sizes)), key=lambda t: self.tensor_ids[t])
        self.bounds = shard_bounds(sum(self.sizes), shards)
        starts = [0]
        for size in self.sizes:
            starts.append(starts[-1] + size)
        ends = [0]  # where each tensor, in ``order``, ends in the shards' sequence
        for t in self.order:
            ends.append(ends[-1] + self.sizes[t])
        #: per shard, ``(tensor index, offset in the tensor, length)`` of each piece, in order
        self.pieces: list[list[tuple[int, int, int]]] = []
        #: per shard, the :class:`PerTensor` compressor of its pieces (None for an empty shard)
        self.parts: list[Optional[PerTensor]] = []
        for a, b in zip(self.bounds, self.bounds[1:]):
            pieces = [(t, max(a, lo) - lo, min(b, hi) - max(a, lo))
                      for t, lo, hi in zip(self.order, ends, ends[1:]) if min(b, hi) > max(a, lo)]
            self.pieces.append(pieces)
            self.parts.append(PerTensor(base, [n for _, _, n in pieces],
                                        [piece_id(self.tensor_ids[t], o) for t, o, _ in pieces]) if pieces else None)
        identity = self.order == sorted(self.order)
        #: the vector's position of each value of the shards' sequence (None: the same order)
        self._positions = None if identity else torch.cat(
            [torch.arange(starts[t], starts[t + 1]) for t in self.order])
        self._empty = tuple((dtype, 0) for dtype, _ in base.layout(1))

    @property
    def shards(self) -> int:
        return len(self.parts)

    def shard_numel(self, j: int) -> int:
        return self.bounds[j + 1] - self.bounds[j]

    def shard_layout(self, j: int) -> Layout:
        part = self.parts[j]
        return part.layout(self.shard_numel(j)) if part is not None else self._empty

    def shard_bytes(self, j: int) -> int:
        """The payload bytes of shard ``j``: what goes to process ``j`` in stage 1, and what it sends in stage 2."""
        return sum(count * torch.empty((), dtype=dtype).element_size() for dtype, count in self.shard_layout(j))

    def layout(self, numel: int) -> Layout:
        if numel != sum(self.sizes):
            raise ValueError(f"a vector of {numel} values does not match tensor sizes summing to {sum(self.sizes)}")
        return tuple(slot for j in range(self.shards) for slot in self.shard_layout(j))

    def split(self, payload: Payload) -> list[Payload]:
        """The payload of each shard."""
        width = len(self._empty)
        return [tuple(payload[j * width: (j + 1) * width]) for j in range(self.shards)]

    def sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s values in the shards' order (shard ``j`` is ``[bounds[j], bounds[j + 1])`` of it)."""
        return x if self._positions is None else x[self._positions.to(x.device)]

    def assemble(self, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """The vector whose shards are ``shards`` (each shard's values)."""
        flat = torch.cat(list(shards))
        if self._positions is None:
            return flat
        out = torch.empty_like(flat)
        out[self._positions.to(flat.device)] = flat
        return out

    def compress_shard(self, j: int, x: torch.Tensor, *, shared_seed: int = 0, private_seed: int = 0) -> Payload:
        """Shard ``j``'s payload for ``x``, that shard's values."""
        part = self.parts[j]
        if part is None:
            return tuple(torch.empty(0, dtype=dtype, device=x.device) for dtype, _ in self._empty)
        return part.compress(x, shared_seed=shared_seed, private_seed=private_seed)

    def decompress_shard(self, j: int, payload: Payload, *, shared_seed: int = 0) -> torch.Tensor:
        """What shard ``j``'s payload decodes to (its values)."""
        part = self.parts[j]
        if part is None:
            return torch.zeros(0, dtype=torch.float32, device=payload[0].device)
        return part.decompress(payload, self.shard_numel(j), shared_seed=shared_seed)

    def compress(self, x, *, shared_seed=0, private_seed=0):
        x = self.sequence(x.float())
        return tuple(slot for j in range(self.shards)
                     for slot in self.compress_shard(j, x[self.bounds[j]: self.bounds[j + 1]], shared_seed=shared_seed,
                                                     private_seed=private_seed))

    def decompress(self, payload, numel, *, shared_seed=0):
        return self.assemble([self.decompress_shard(j, part, shared_seed=shared_seed)
                              for j, part in enumerate(self.split(payload))])

    def describe(self) -> dict:
        return dict(self.base.describe(), per_tensor=True, shards=self.shards)


#: The methods that send a fraction ``compression_ratio`` of the coordinates, and that fraction's default (gdsec's
#: count follows its threshold instead).
RATIO_METHODS: tuple[str, ...] = ("topk", "randk")
DEFAULT_RATIO = 0.01
#: The methods that keep one scale per ``chunk_size`` values.
CHUNK_METHODS: tuple[str, ...] = ("int8", "sign")

#: Each method's compressor from the options ``(compression_ratio, chunk_size, rescale)`` of
#: :func:`build_compressor`; ``gdsec`` selects with :class:`Significant` (GD-SEC).
_BUILDERS: dict[str, Callable[[float, int, bool], Compressor]] = {
    "none": lambda ratio, chunk, rescale: Identity(),
    "fp16": lambda ratio, chunk, rescale: Cast(CAST_DTYPES["fp16"]),
    "bf16": lambda ratio, chunk, rescale: Cast(CAST_DTYPES["bf16"]),
    "int8": lambda ratio, chunk, rescale: Int8(chunk),
    "sign": lambda ratio, chunk, rescale: Sign(chunk),
    "topk": lambda ratio, chunk, rescale: TopK(ratio),
    "randk": lambda ratio, chunk, rescale: RandK(ratio, rescale),
    "gdsec": lambda ratio, chunk, rescale: Significant(),
}
#: The names :func:`build_compressor` knows.
COMPRESSORS: tuple[str, ...] = tuple(_BUILDERS)


def build_compressor(name: str, *, compression_ratio: float = DEFAULT_RATIO, chunk_size: int = 1024,
                     rescale: bool = False) -> Compressor:
    """The compressor called ``name`` (one of :data:`COMPRESSORS`)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")
    return _BUILDERS[name](compression_ratio, chunk_size, rescale)
