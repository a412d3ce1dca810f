"""GSOFT as a PEFT method: registration, loading paths, and agreement with PEFT's OFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import OFTConfig, PeftConfig, get_peft_model, inject_adapter_in_model
from peft import mapping as peft_mapping
from torch import nn

import gsoft
from gsoft import gs
from gsoft.tuner.peft_type import GSOFTPeftType, register_with_peft


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def test_registered_in_peft_tables():
    key = GSOFTPeftType.GSOFT
    assert peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING["GSOFT"] is gsoft.GSOFTConfig
    assert peft_mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] is gsoft.GSOFTModel
    assert peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] == "gsoft_"
    assert gsoft.GSOFTConfig(block_size=4).peft_type.value == "GSOFT"


def test_registration_is_idempotent_and_refuses_to_overwrite(monkeypatch):
    register_with_peft(gsoft.GSOFTConfig, gsoft.GSOFTModel)  # same classes again: fine
    table = dict(peft_mapping.PEFT_TYPE_TO_CONFIG_MAPPING)
    table[GSOFTPeftType.GSOFT] = OFTConfig
    monkeypatch.setattr(peft_mapping, "PEFT_TYPE_TO_CONFIG_MAPPING", table)
    with pytest.raises(KeyError, match="refusing to overwrite"):
        register_with_peft(gsoft.GSOFTConfig, gsoft.GSOFTModel)


def test_config_round_trip(tmp_path):
    config = gsoft.GSOFTConfig(block_size=4, target_modules=["lin0"], double=True, n_factors="auto")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GSOFT" and saved["n_factors"] == "auto"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, gsoft.GSOFTConfig)
    assert loaded.double and loaded.n_factors == "auto" and loaded.block_size == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 4, "n_blocks": 2}, "only one of `block_size` and `n_blocks`"),
        ({"block_size": 4, "orthogonal_map": "qr"}, "Unknown orthogonal_map 'qr'"),
        ({"block_size": 4, "n_factors": 0}, "n_factors must be an int >= 1 or 'auto', got 0"),
        ({"block_size": 1}, "block_size must be an int >= 2"),
        ({"block_size": 4, "bias": "lora_only"}, "bias must be"),
        ({"block_size": 4, "neumann_terms": 0}, "neumann_terms must be"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gsoft.GSOFTConfig(**kwargs)


def test_load_adapter_and_inject(tmp_path):
    x = torch.randn(3, 16)
    peft_model = get_peft_model(make_mlp(), gsoft.GSOFTConfig(block_size=4, target_modules=["lin0", "lin1"], init_weights=False))
    expected = peft_model(x)
    peft_model.save_pretrained(tmp_path / "a")

    # load_adapter as a second adapter on a PeftModel
    other = get_peft_model(make_mlp(), gsoft.GSOFTConfig(block_size=4, target_modules=["lin0", "lin1"]))
    other.load_adapter(tmp_path / "a", adapter_name="loaded")
    other.set_adapter("loaded")
    torch.testing.assert_close(other(x), expected)

    # inject_adapter_in_model + the saved state dict gives the same model without a PeftModel wrapper
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(tmp_path / "a")
    bare = inject_adapter_in_model(config, make_mlp())
    assert isinstance(bare.lin0, gsoft.tuner.Linear)
    set_peft_model_state_dict(bare, load_file(tmp_path / "a" / "adapter_model.safetensors"))
    torch.testing.assert_close(bare(x), expected)


def test_transformers_load_adapter(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def tiny_gpt2():
        torch.manual_seed(0)
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16)
        return GPT2LMHeadModel(cfg).eval()

    ids = torch.randint(0, 64, (2, 8))
    peft_model = get_peft_model(tiny_gpt2(), gsoft.GSOFTConfig(block_size=8, init_weights=False))
    expected = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path)
    model = tiny_gpt2()
    model.load_adapter(str(tmp_path))
    torch.testing.assert_close(model(input_ids=ids).logits, expected)


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_fresh_process_loading(tmp_path):
    """PeftModel.from_pretrained in a new interpreter works after `import gsoft`; without it PEFT does not know the
    adapter's type and fails with its own ``KeyError: 'GSOFT'`` (the README names that error and the fix)."""
    x = torch.randn(3, 16)
    peft_model = get_peft_model(make_mlp(), gsoft.GSOFTConfig(block_size=4, target_modules=["lin0", "lin1"], double=True, init_weights=False))
    torch.save({"x": x, "y": peft_model(x).detach()}, tmp_path / "io.pt")
    peft_model.save_pretrained(tmp_path / "adapter")
    # the model is defined inline: importing this test module would import gsoft
    model_src = """
import torch
from torch import nn
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 8)
    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))
def make_mlp(seed=0):
    torch.manual_seed(seed)
    return MLP()
"""

    ok = _run(
        model_src
        + """
import torch, gsoft
from peft import PeftModel
io = torch.load("io.pt")
model = PeftModel.from_pretrained(make_mlp(), "adapter")
torch.testing.assert_close(model(io["x"]), io["y"])
print("LOADED-OK")
""",
        tmp_path,
    )
    assert "LOADED-OK" in ok.stdout, ok.stderr

    missing = _run(
        model_src
        + """
import sys
from peft import PeftModel
try:
    PeftModel.from_pretrained(make_mlp(), "adapter")
finally:
    print("GSOFT-IMPORTED" if "gsoft" in sys.modules else "GSOFT-NOT-IMPORTED")
""",
        tmp_path,
    )
    assert missing.returncode != 0
    assert "GSOFT-NOT-IMPORTED" in missing.stdout, missing.stdout  # nothing imports gsoft behind the user's back
    assert missing.stderr.rstrip().endswith("KeyError: 'GSOFT'"), missing.stderr


def test_n_factors_1_reproduces_peft_oft():
    """Same skew parameters -> same outputs as PEFT's OFT with the exact Cayley map."""
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    oft = get_peft_model(make_mlp(), OFTConfig(oft_block_size=4, r=0, target_modules=["lin0", "lin1"], use_cayley_neumann=False, init_weights=False))
    ours = get_peft_model(make_mlp(), gsoft.GSOFTConfig(block_size=4, n_factors=1, scaling=False, target_modules=["lin0", "lin1"]))
    with torch.no_grad():
        for name in ("lin0", "lin1"):
            oft_layer = getattr(oft.base_model.model, name)
            our_layer = getattr(ours.base_model.model, name)
            our_layer.gsoft_in["default"].skew.copy_(oft_layer.oft_R["default"].weight.unsqueeze(0))
    torch.testing.assert_close(ours(x), oft(x), atol=1e-5, rtol=1e-5)


def test_parameter_counts_match_readme_formulas():
    """README: GSOFT = m * (d_in / b) * b(b-1)/2 + d_out; Double adds m * (d_out / b) * b(b-1)/2."""
    for double in (False, True):
        model = get_peft_model(make_mlp(), gsoft.GSOFTConfig(block_size=4, target_modules=["lin0", "lin1"], double=double))
        expected = 0
        for d_in, d_out in ((16, 24), (24, 8)):
            expected += gs.gs_param_count(d_in, 4, 2) + d_out
            expected += gs.gs_param_count(d_out, 4, 2) if double else 0
        assert expected == 2 * (4 * 6 + 6 * 6) + 32 + (2 * (6 * 6 + 2 * 6) if double else 0)
        assert model.get_nb_trainable_parameters()[0] == expected


def test_non_dense_configuration_is_logged_once(caplog, monkeypatch):
    from gsoft.tuner import model as tuner_model

    monkeypatch.setattr(tuner_model, "_REPORTED_SPARSE", set())
    with caplog.at_level("WARNING", logger="gsoft"):
        get_peft_model(make_mlp(), gsoft.GSOFTConfig(block_size=2, target_modules=["lin0", "lin1"]))
    records = [r for r in caplog.records if "not dense" in r.getMessage()]
    assert len(records) == 1
    assert "n=16, block_size=2, n_factors=2" in records[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="gsoft"):  # the same sizes again (a reload): nothing new to say
        get_peft_model(make_mlp(), gsoft.GSOFTConfig(block_size=2, target_modules=["lin0", "lin1"]))
    assert not [r for r in caplog.records if "not dense" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="gsoft"):
        get_peft_model(make_mlp(), gsoft.GSOFTConfig(block_size=2, n_factors="auto", target_modules=["lin0", "lin1"]))
    assert not [r for r in caplog.records if "not dense" in r.getMessage()]
