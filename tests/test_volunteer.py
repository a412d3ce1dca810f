"""Tests of gsoft.distributed.volunteer (hivemind peers): settings, codecs and their byte counts, the accounting of
averaging rounds, and two peers on loopback, one of which cannot decode what it receives (the failure hivemind's
all-reduce reports as a success). The GLUE recipe's swarm test is in tests/test_roberta_glue.py."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gsoft.distributed import volunteer
from gsoft.distributed.volunteer import AveragingFailed, RoundLog, VolunteerConfig

hivemind = pytest.importorskip("hivemind")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _config(**overrides) -> VolunteerConfig:
    return VolunteerConfig(**{"run_id": "t", "target_batch_size": 64, "batch_size_per_step": 8, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"run_id": ""}, "run_id ''"),
    ({"target_batch_size": 0}, "target_batch_size 0"),
    ({"batch_size_per_step": True}, "batch_size_per_step True"),
    ({"mode": "sync"}, "mode 'sync'"),
    ({"compression": "topk"}, "compression 'topk'"),
    ({"powersgd_rank": 2}, "needs mode 'gradients'"),
    ({"matchmaking_time": 0}, "matchmaking_time 0"),
    ({"matchmaking_time": 10.0, "averaging_timeout": 5.0}, "averaging_timeout 5.0 must exceed"),
    ({"initial_peers": "/ip4/1.2.3.4/tcp/1/p2p/Qm"}, "not one string"),
    ({"host_maddrs": []}, "host_maddrs is empty"),
    ({"min_peers": 0}, "min_peers 0"),
])
def test_config_refuses_bad_values_naming_them(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("'", "'")):
        _config(**overrides)


def test_config_keeps_addresses_as_tuples_and_accepts_gradients_with_powersgd():
    config = _config(initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/Qm"], mode="gradients", powersgd_rank=2)
    assert config.initial_peers == ("/ip4/127.0.0.1/tcp/1/p2p/Qm",) and config.host_maddrs == ("/ip4/0.0.0.0/tcp/0",)


# ---- codecs ----------------------------------------------------------------------------------------------------------
def test_every_offered_codec_round_trips_and_counts_its_bytes():
    from hivemind.compression.base import CompressionInfo

    traffic = volunteer.install_codecs()
    assert volunteer.install_codecs() is traffic  # once per process
    x = torch.randn(4096)
    for name, wire in volunteer.CODECS.items():
        codec = volunteer.codec(name)
        sent, received = traffic.sent, traffic.received
        message = codec.compress(x, CompressionInfo.from_tensor(x))
        out = codec.extract(message)
        assert traffic.sent - sent == len(message.buffer) == traffic.received - received > 0
        error = (out - x).abs()
        if name == "none":
            assert torch.equal(out, x)
        elif name.endswith("fp16"):
            assert float(error.max()) <= 2e-3 * float(x.abs().max()), name
        else:  # 256 levels over a few standard deviations (uniform8bit clips the tails)
            assert out.shape == x.shape and float(error.mean()) <= 0.02, (name, float(error.mean()))
    # the payloads shrink as the codecs promise: 4 bytes a value uncompressed, 2 in fp16, about 1 in 8 bits
    sizes = {name: len(volunteer.codec(name).compress(x, CompressionInfo.from_tensor(x)).buffer)
             for name in volunteer.CODECS}
    assert sizes["none"] == 4 * 4096 and sizes["fp16"] == 2 * 4096 and sizes["uniform8bit"] < 4096 + 2048


def test_gsoft_int8_is_unbiased_in_hivemind_uniform_8bit_format():
    """gsoft's int8 message is a uniform 8-bit one (hivemind's decoder reads it), its rounding unbiased: the mean of
    many decodes converges to the input, unlike one decode's error of up to a level."""
    from hivemind.compression.base import CompressionInfo
    from hivemind.proto import runtime_pb2

    volunteer.install_codecs()
    int8, x = volunteer.codec("int8"), torch.randn(2000)
    message = int8.compress(x, CompressionInfo.from_tensor(x))
    assert message.compression == runtime_pb2.UNIFORM_8BIT and len(message.buffer) == 8 + 4 * 256 + 2000
    level = float(x.abs().max()) / 127
    decodes = torch.stack([int8.extract(int8.compress(x, CompressionInfo.from_tensor(x))) for _ in range(400)])
    assert float((decodes[0] - x).abs().max()) <= level * 1.001
    assert float((decodes.mean(0) - x).abs().max()) < 0.2 * level  # unbiased: about level / (2 sqrt(400)) per value
    assert type(volunteer.codec("uniform8bit").inner).__name__ != "_GsoftInt8"  # the choice is per process


def test_fixed_8bit_decoder_reads_hivemind_encoding_exactly():
    """gsoft's decoder gives hivemind's codebook lookup of hivemind's own message (the wire format stays)."""
    import numpy as np
    from hivemind.compression.base import CompressionInfo
    from hivemind.compression.quantization import Quantile8BitQuantization, Uniform8BitQuantization

    x = torch.randn(1000)
    for original in (Uniform8BitQuantization(), Quantile8BitQuantization()):
        message = original.compress(x, CompressionInfo.from_tensor(x))
        size = int(np.frombuffer(message.buffer, count=1, dtype=np.int64)[0])
        codebook = torch.as_tensor(np.frombuffer(message.buffer, offset=8, count=size, dtype=np.float32))
        indices = torch.as_tensor(np.frombuffer(message.buffer, offset=8 + 4 * size, dtype=np.uint8)).long()
        decoded = volunteer._Fixed8BitDecoder(original).extract(message)
        assert torch.equal(decoded, codebook[indices])
        if np.lib.NumpyVersion(np.__version__) >= "2.0.0":  # the decoder gsoft replaces there
            with pytest.raises(TypeError):
                original.extract(message)


# ---- averaging rounds ------------------------------------------------------------------------------------------------
def _round(result=None, error=None, cancel=False) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    if cancel:
        future.cancel()
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
    return future


def test_round_log_counts_outcomes_warns_and_stops_after_a_streak(caplog):
    log = RoundLog(max_failed=3)
    log.watch(_round({"peer": 1}), "state averaging")
    log.watch(_round(cancel=True), "state averaging")  # hivemind cancels rounds it scheduled and did not need
    log.check()
    assert log.summary() == {"succeeded": 1, "failed": 0, "partial": 0, "cancelled": 1}
    with caplog.at_level(logging.WARNING, logger="gsoft.distributed.volunteer"):
        log.watch(_round(error=TimeoutError("no reply")), "gradient averaging")
        log.check()
        log.watch(_round(None), "state averaging")  # hivemind's "no group was formed"
        log.check()
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "averaging round failed (gradient averaging: TimeoutError('no reply'))",
        "averaging round failed (state averaging: no group was formed)",
    ]
    log.watch(_round({"peer": 1}), "state averaging")  # a clean round ends the streak
    log.check()
    for _ in range(2):
        log.watch(_round(error=ConnectionError("reset")), "state averaging")
        log.check()
    handler = log.partial_handler()  # what hivemind's averaging process logs when parts never arrive
    handler.emit(logging.LogRecord("hivemind.averaging.partition", logging.WARNING, __file__, 1,
                                   "Reducer: received 50.0% of input tensors", None, None))
    with pytest.raises(AveragingFailed, match="3 averaging rounds in a row failed or lost parts"):
        log.check()
    assert log.summary() == {"succeeded": 2, "failed": 4, "partial": 1, "cancelled": 1}


def test_wait_for_peers_times_out_with_the_fix():
    dht = volunteer.start_dht(_config(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False))
    try:
        assert volunteer.wait_for_peers(dht, _config(min_peers=1)) == 1
        with pytest.raises(TimeoutError, match="min_peers 2: only 1 peer.*lower --min_peers"):
            volunteer.wait_for_peers(dht, _config(min_peers=2, peer_wait_timeout=1.0))
    finally:
        dht.shutdown()


def test_joining_an_absent_peer_is_one_clear_error():
    with pytest.raises(OSError, match="cannot join the swarm.*Check that an initial peer is running"):
        volunteer.start_dht(_config(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False,
                                    initial_peers=["/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDoyPvgE9aMDNrxuaj8dzY3PU2SaEW142hDEpL5jR8y6X"]))


# ---- two peers on loopback -------------------------------------------------------------------------------------------
PEER = textwrap.dedent('''
    import json, sys, time, torch
    from gsoft.distributed import volunteer
    out, address_file, broken, rank, codec = sys.argv[1], sys.argv[2], sys.argv[3] == "broken", int(sys.argv[5]), sys.argv[6]
    initial = [open(address_file).read().strip()] if sys.argv[4] == "join" else []
    config = volunteer.VolunteerConfig(
        run_id="pair", target_batch_size=256, batch_size_per_step=8, initial_peers=initial, average_state_every=4,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_relay=False, mode="gradients", compression=codec,
        matchmaking_time=1.0, averaging_timeout=10.0, max_failed_rounds=2, min_peers=2, powersgd_rank=rank)
    dht = volunteer.start_dht(config)
    if not initial:
        open(address_file + ".tmp", "w").write(volunteer.visible_addresses(dht)[0])
        import os; os.replace(address_file + ".tmp", address_file)
    if broken:  # hivemind's own 8-bit decoder under numpy 2: every part from the other peer fails to decode
        from hivemind.compression import serialization
        volunteer.install_codecs()
        counted = serialization._BASE_COMPRESSION_TYPES["UNIFORM_8BIT"]
        class Broken:
            compression_type, encoder = counted.inner.compression_type, counted.inner
            def compress(self, *args, **kwargs):
                return self.encoder.compress(*args, **kwargs)
            def extract(self, message):
                raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
            def estimate_compression_ratio(self, info):
                return self.encoder.estimate_compression_ratio(info)
        counted.inner = Broken()
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1)
    optimizer = volunteer.make_optimizer(config, dht, torch.optim.SGD(model.parameters(), lr=0.05))
    volunteer.wait_for_peers(dht, config)
    x = torch.randn(512, 64); y = x.sum(1, keepdim=True)
    outcome = "finished"
    try:
        deadline = time.monotonic() + 60
        while optimizer.local_epoch < 4 and time.monotonic() < deadline:
            i = torch.randint(0, 512, (8,))
            ((model(x[i]) - y[i]) ** 2).mean().backward()
            optimizer.step(); optimizer.zero_grad(); time.sleep(0.05)
        optimizer.finish()
    except volunteer.AveragingFailed as exc:
        outcome = f"AveragingFailed: {exc}"
    json.dump({"outcome": outcome, "epoch": optimizer.local_epoch, "rounds": optimizer.rounds.summary(),
               "averager": type(optimizer.grad_averager).__name__,
               "sent": optimizer.traffic.sent, "received": optimizer.traffic.received}, open(out, "w"))
    optimizer.shutdown(); dht.shutdown()
''')


def _pair(tmp_path: Path, broken: str, powersgd_rank: int = 0, codec: str = "uniform8bit") -> tuple[dict, dict, str]:
    """Two peers averaging gradients in 8 bits (``codec``; through hivemind's PowerSGD with ``powersgd_rank``);
    ``broken``: "" or which of "a"/"b" cannot decode."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    address = tmp_path / "address"
    procs = {}
    for name, role in (("a", "start"), ("b", "join")):
        if role == "join":
            deadline = time.monotonic() + 120
            while not address.is_file():
                assert time.monotonic() < deadline and procs["a"].poll() is None, "peer a did not start"
                time.sleep(0.2)
        procs[name] = subprocess.Popen(
            [sys.executable, "-c", PEER, str(tmp_path / f"{name}.json"), str(address),
             "broken" if broken == name else "ok", role, str(powersgd_rank), codec],
            cwd=REPO_ROOT, env=env, stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT)
    for proc in procs.values():
        proc.wait(timeout=300)
    logs = "".join((tmp_path / f"{name}.log").read_text() for name in "ab")
    return (json.loads((tmp_path / "a.json").read_text()), json.loads((tmp_path / "b.json").read_text()), logs)


def test_two_peers_average_powersgd_factors_in_gsoft_int8_and_count_bytes(tmp_path):
    a, b, logs = _pair(tmp_path, broken="", powersgd_rank=1, codec="int8")
    assert a["outcome"] == b["outcome"] == "finished", logs[-3000:]
    assert a["averager"] == "AccountedPowerSGDGradientAverager"
    assert a["rounds"]["succeeded"] > 0 and a["rounds"]["failed"] + a["rounds"]["partial"] <= 1, logs[-3000:]
    assert a["sent"] > 0 and a["received"] > 0 and b["sent"] > 0
    assert "lost parts" not in logs


def test_a_peer_that_cannot_decode_stops_instead_of_training_alone(tmp_path):
    """The failure hivemind reports as a successful round (parts dropped): warned about, then AveragingFailed."""
    _, b, logs = _pair(tmp_path, broken="b")
    assert b["outcome"].startswith("AveragingFailed: 2 averaging rounds in a row failed or lost parts"), logs[-3000:]
    assert b["rounds"]["partial"] >= 1 and "an averaging round lost parts" in logs
