"""Shared fixtures and tiny-model builders for the gsoft test-suite.

Every model here is built from a config with fixed seeds (no downloads, no weights) and is small enough for a 2-core
CPU. Builders are cached and handed out as deep copies, so two calls give two *identical, independent* base models:
tests use that for "a fresh copy of the base model".
"""

from __future__ import annotations

import copy
import functools
import os
import random
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# Keep runs reproducible and quiet; the machine has 2 cores.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The models are tiny: intra-op threads only add overhead, and with 2 cores they thrash badly as soon as anything else
# runs (every op then waits ~10 ms on its OpenMP team). One thread makes the suite fast and its timings stable.
torch.set_num_threads(1)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a multi-process test's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_spawned(jobs: list[tuple[Callable[..., None], tuple]], timeout_s: float = 600) -> list[int]:
    """Start every ``(target, args)`` in a spawned process, wait for all (``timeout_s`` each is only a hang guard: a
    busy 2-core machine is slow), kill what still runs, and return the exit codes."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for target, args in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _case_worker(rank: int, world: int, port: int, out_dir: str, cases: Callable[[], dict[str, Callable[[int], Any]]],
                 timeout_s: float) -> None:
    """One process of a gloo job: every case of ``cases()`` with this rank (a failing case is recorded as its
    traceback, for the test that reads it), then what each returned, saved as ``rank<r>.pt``."""
    import datetime
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    results: dict[str, Any] = {}
    for name, case in cases().items():
        try:
            results[name] = case(rank)
        except Exception:  # noqa: BLE001 - reported by the test that reads this case
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def spawn_cases(out_dir: Path, world: int, cases: Callable[[], dict[str, Callable[[int], Any]]],
                timeout_s: float = 60) -> list[dict[str, Any]]:
    """Run ``cases`` (a module-level function: the spawned processes import it) in one ``world``-process gloo job
    over loopback, one spawn for all of them (starting processes costs seconds); each rank's results, by case name.
    ``timeout_s`` is the process group's timeout (a collective that waits longer fails)."""
    port = free_port()
    codes = run_spawned([(_case_worker, (rank, world, port, str(out_dir), cases, timeout_s))
                         for rank in range(world)])
    assert codes == [0] * world, f"workers exited with {codes}"
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def frozen_base_mlp(in_features: int, hidden: int, out_features: int) -> torch.nn.Module:
    """A seeded Linear-Tanh-Linear whose first layer is frozen: a trained head behind a frozen base, the smallest
    model whose trained parameters are a subset (the shape the communication tests use)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.Tanh(),
                                torch.nn.Linear(hidden, out_features))
    model[0].requires_grad_(False)
    return model


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@pytest.fixture
def hub_downloads(monkeypatch) -> list[str]:
    """The file names transformers asks the hub for during the test (the downloads still run; offline they fail)."""
    import transformers.utils.hub

    fetched: list[str] = []
    download = transformers.utils.hub.hf_hub_download

    def counting(*args, **kwargs):
        fetched.append(kwargs["filename"] if "filename" in kwargs else args[1])
        return download(*args, **kwargs)

    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", counting)
    return fetched


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    random.seed(0)
    yield


# ----------------------------------------------------------------------------------------------------------------------
# Plain torch models
# ----------------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """``lin0 -> relu -> lin1 -> relu -> lin2`` (``lin2`` is the head, a natural ``modules_to_save`` candidate)."""

    def __init__(self, sizes: tuple[int, int, int] = (16, 32, 16), n_out: int = 4, bias: bool = True) -> None:
        super().__init__()
        n_in, n_hidden, n_last = sizes
        self.lin0 = nn.Linear(n_in, n_hidden, bias=bias)
        self.act0 = nn.ReLU()
        self.lin1 = nn.Linear(n_hidden, n_last, bias=bias)
        self.act1 = nn.ReLU()
        self.lin2 = nn.Linear(n_last, n_out, bias=bias)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803 - PEFT's custom-model tests use `X`
        return self.lin2(self.act1(self.lin1(self.act0(self.lin0(X)))))


class ConvNet(nn.Module):
    """Two Conv2d layers (stride, padding, dilation, a non-square kernel, circular padding), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(8, 16, kernel_size=(3, 2), stride=2, padding=1, dilation=2)
        self.act0 = nn.ReLU()
        self.conv1 = nn.Conv2d(16, 8, kernel_size=3, padding=1, padding_mode="circular")
        self.act1 = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin = nn.Linear(8 * 5 * 5, 4)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803
        return self.lin(self.flat(self.act1(self.conv1(self.act0(self.conv0(X))))))


class EmbeddingMLP(nn.Module):
    """An embedding followed by a linear layer (for the unsupported-layer error test)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.lin0 = nn.Linear(16, 16)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803
        return self.lin0(self.emb(X))


class GroupedConvNet(nn.Module):
    """A grouped convolution (``groups=2``), which GSOFT must refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=2)

    def forward(self, X: torch.Tensor) -> torch.Tensor:  # noqa: N803
        return self.conv0(X)


# ----------------------------------------------------------------------------------------------------------------------
# Builders (cached, deep-copied)
# ----------------------------------------------------------------------------------------------------------------------
def _cached(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """Build once with a fixed seed, then hand out deep copies (identical, independent base models)."""

    @functools.lru_cache(maxsize=None)
    def build() -> nn.Module:
        state = torch.random.get_rng_state()
        torch.manual_seed(1234)
        try:
            return fn().eval()
        finally:
            torch.random.set_rng_state(state)

    @functools.wraps(fn)
    def fresh() -> nn.Module:
        return copy.deepcopy(build())

    return fresh


@_cached
def tiny_mlp() -> nn.Module:
    return MLP((16, 32, 16))


@_cached
def tiny_mlp_no_bias() -> nn.Module:
    return MLP((16, 32, 16), bias=False)


@_cached
def tiny_mlp_odd() -> nn.Module:
    return MLP((24, 40, 24))


@_cached
def tiny_convnet() -> nn.Module:
    return ConvNet()


@_cached
def tiny_roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        type_vocab_size=1,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        pad_token_id=1,
        initializer_range=0.1,  # larger than the default 0.02, so that tiny adapters visibly change outputs
    )
    return RobertaForSequenceClassification(config)


@_cached
def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=100,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        initializer_range=0.1,
        bos_token_id=0,  # the defaults (50256) lie outside the tiny vocabulary
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


@_cached
def tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Inputs (deterministic, independent of the global RNG)
# ----------------------------------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mlp_inputs(n_in: int = 16, seed: int = 0) -> dict[str, Any]:
    return {"X": torch.randn(6, n_in, generator=_gen(seed))}


def conv_inputs(seed: int = 0) -> dict[str, Any]:
    return {"X": torch.randn(2, 8, 11, 9, generator=_gen(seed))}


def token_inputs(seed: int = 0, vocab_size: int = 100, batch: int = 2, length: int = 8) -> dict[str, Any]:
    ids = torch.randint(3, vocab_size, (batch, length), generator=_gen(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def unet_inputs(seed: int = 0) -> dict[str, Any]:
    g = _gen(seed)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([1, 10]),
        "encoder_hidden_states": torch.randn(2, 3, 8, generator=g),
    }


def model_output(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Run a model and return its main output tensor (logits for transformers, ``sample`` for diffusers)."""
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "sample"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"Don't know how to get the output tensor of {type(out).__name__}.")
