"""Tuner test-suite for GSOFT and Double GSOFT, in the spirit of PEFT's own custom-model tests.

Every model case (small MLPs, a conv net, tiny RoBERTa / GPT-2 built from configs, a tiny diffusers UNet) runs the
common checks -- identity at init, save/load, state-dict keys, merging, unloading, disabling, several adapters,
training -- once with GSOFT and once with Double GSOFT. Feature-specific tests (modules_to_save, layers_to_transform,
bias, half precision, gradient checkpointing, torch.compile, inject_adapter_in_model) and error tests follow.

All models are built from configs with fixed seeds (see ``conftest.py``); nothing is downloaded.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from conftest import (
    MLP,
    EmbeddingMLP,
    GroupedConvNet,
    conv_inputs,
    mlp_inputs,
    model_output,
    tiny_convnet,
    tiny_gpt2,
    tiny_mlp,
    tiny_mlp_no_bias,
    tiny_mlp_odd,
    tiny_roberta,
    tiny_unet,
    token_inputs,
    unet_inputs,
)
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from torch import nn

import gsoft
from gsoft import gs
from gsoft.tuner import GSOFTLayer, GSOFTModel

pytestmark = [
    # transformers 5 renamed gradient checkpointing; PEFT 0.21 still reads the old attribute on every get_peft_model
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
]

# ----------------------------------------------------------------------------------------------------------------------
# Model cases
# ----------------------------------------------------------------------------------------------------------------------
_ROBERTA_DEFAULT = (
    r".*\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]  # a fresh, identical base model on every call
    inputs: Callable[..., dict[str, Any]]  # inputs(seed=0) -> kwargs of the forward
    config: dict[str, Any]  # GSOFTConfig kwargs (double / init_weights are added per test)
    targets: str  # full-match regex over the base model's module names: exactly these must be adapted

    def __repr__(self) -> str:  # short ids in failure messages
        return f"Case({self.name})"


CASES = [
    # n_factors="auto" gives 2 factors for 16 features and 3 for 32 with block_size=4
    Case("mlp", tiny_mlp, mlp_inputs, {"target_modules": ["lin0", "lin1"], "block_size": 4, "n_factors": "auto"},
         r"lin[01]"),
    Case("mlp-no-bias", tiny_mlp_no_bias, mlp_inputs,
         {"target_modules": ["lin0", "lin1"], "n_blocks": 4, "orthogonal_map": "exp"}, r"lin[01]"),
    # 24 / 40 features: block_size 8 gives 3 and 5 blocks; one factor = OFT-like block-diagonal rotation
    Case("mlp-odd", tiny_mlp_odd, functools.partial(mlp_inputs, 24),
         {"target_modules": ["lin0", "lin1"], "block_size": 8, "n_factors": 1, "scaling": False}, r"lin[01]"),
    Case("conv", tiny_convnet, conv_inputs,
         {"target_modules": ["conv0", "conv1"], "block_size": 4, "orthogonal_map": "cayley_neumann"}, r"conv[01]"),
    Case("roberta", tiny_roberta, token_inputs,
         {"target_modules": ["query", "key", "value"], "block_size": 8, "task_type": "SEQ_CLS"},
         r".*\.attention\.self\.(query|key|value)"),
    Case("roberta-default", tiny_roberta, token_inputs,
         {"target_modules": None, "block_size": 4, "n_factors": "auto", "orthogonal_map": "exp"}, _ROBERTA_DEFAULT),
    Case("gpt2", tiny_gpt2, token_inputs,
         {"target_modules": None, "block_size": 8, "orthogonal_map": "cayley_neumann", "scaling": False},
         r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"),
    Case("unet-attn", tiny_unet, unet_inputs, {"target_modules": None, "block_size": 4},
         r".*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"),
    Case("unet-conv", tiny_unet, unet_inputs,
         {"target_modules": r".*resnets\.\d+\.(conv1|conv2|conv_shortcut)", "block_size": 4, "n_factors": "auto"},
         r".*resnets\.\d+\.(conv1|conv2|conv_shortcut)"),
]
CASES_BY_NAME = {case.name: case for case in CASES}

CASE_PARAMS = [pytest.param(case, id=case.name) for case in CASES]
DOUBLE_PARAMS = [pytest.param(False, id="gsoft"), pytest.param(True, id="double")]


def case_and_double(*names: str):
    """Parametrise a test over some (default: all) model cases and over GSOFT / Double GSOFT."""
    params = CASE_PARAMS if not names else [pytest.param(CASES_BY_NAME[n], id=n) for n in names]

    def decorate(fn):
        return pytest.mark.parametrize("case", params)(pytest.mark.parametrize("double", DOUBLE_PARAMS)(fn))

    return decorate


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
EXACT = {"atol": 1e-6, "rtol": 1e-6}  # same computation up to a few float32 roundings
MERGE = {"atol": 2e-5, "rtol": 2e-4}  # merged weights vs rotating activations: different op order
# max |half - float32| / max |float32| of whole-model outputs. Measured: <= 0.03 (bf16 / autocast), <= 0.004 (fp16),
# while the random adapters change the outputs by >= 0.17 of their magnitude, so ignoring an adapter cannot pass.
HALF_REL_TOL = {torch.bfloat16: 0.06, torch.float16: 0.01}


def make_config(case: Case, **overrides: Any) -> gsoft.GSOFTConfig:
    kwargs = copy.deepcopy(case.config)
    kwargs.update(overrides)
    return gsoft.GSOFTConfig(**kwargs)


def make_peft(case: Case, double: bool, init_weights: bool = False, **overrides: Any) -> PeftModel:
    """The case's base model with a GSOFT adapter 'default' (random, non-identity unless ``init_weights``)."""
    return get_peft_model(case.build(), make_config(case, double=double, init_weights=init_weights, **overrides))


@torch.no_grad()
def run(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model_output(model, inputs).detach().clone()


def gsoft_layers(model: nn.Module) -> dict[str, GSOFTLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, GSOFTLayer)}


def strip(name: str) -> str:
    """PeftModel module name -> base model module name."""
    return name.removeprefix("base_model.model.")


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the base weights of every adapted layer, keyed by the adapted layer's name."""
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in gsoft_layers(model).items()}


def assert_not_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> None:
    """At least ``rel`` times the magnitude of ``b`` apart somewhere (far above float32 noise)."""
    diff = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    assert diff > rel * scale, f"expected the tensors to differ, max |diff| = {diff} (max |b| = {scale})"


def weight_out_in(layer: GSOFTLayer) -> torch.Tensor:
    """The base weight of an adapted layer as ``(out, in, ...)`` (transformers' Conv1D stores ``(in, out)``)."""
    weight = layer.get_base_layer().weight.detach()
    return weight.T if getattr(layer, "fan_in_fan_out", False) else weight


def random_target(out: torch.Tensor, seed: int = 123) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)


def loss_fn(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """A loss whose gradient reaches every parameter that influences the output (unlike ``out.sum()`` after softmax)."""
    out = model_output(model, inputs)
    return (out.float() * random_target(out).float()).mean() + out.float().pow(2).mean()


def modules_to_save_names(model: nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)}


def expected_skew_shape(config: gsoft.GSOFTConfig, n: int) -> tuple[int, int, int]:
    b = config.block_size if config.block_size is not None else n // config.n_blocks
    r = n // b
    m = gs.auto_n_factors(r, b) if config.n_factors == "auto" else config.n_factors
    return m, r, b * (b - 1) // 2


def exact_map(case: Case) -> dict[str, Any]:
    """Cayley-Neumann is approximate (not orthogonal for random skews); tests of exact orthogonality use Cayley."""
    return {"orthogonal_map": "cayley"} if case.config.get("orthogonal_map") == "cayley_neumann" else {}


# ----------------------------------------------------------------------------------------------------------------------
# Common checks, every model case x {GSOFT, Double GSOFT}
# ----------------------------------------------------------------------------------------------------------------------
@case_and_double()
def test_identity_at_init(case: Case, double: bool) -> None:
    inputs = case.inputs()
    expected = run(case.build(), inputs)

    model = make_peft(case, double, init_weights=True)
    assert len(gsoft_layers(model)) > 0
    torch.testing.assert_close(run(model, inputs), expected, **EXACT)

    # the random init used by the other tests really is a different function
    assert_not_close(run(make_peft(case, double, init_weights=False), inputs), expected)


@case_and_double()
def test_adapted_layers_and_state_dict_keys(case: Case, double: bool) -> None:
    base = case.build()
    model = make_peft(case, double)
    config = model.peft_config["default"]
    assert config.peft_type == gsoft.GSOFTPeftType.GSOFT
    assert isinstance(model.base_model, GSOFTModel)

    layers = gsoft_layers(model)
    adapted = {strip(name) for name in layers}
    expected = {name for name, _ in base.named_modules() if re.fullmatch(case.targets, name)}
    assert expected, "the case's target regex matches nothing: fix the test"
    assert adapted == expected

    expected_keys = set()
    for name, layer in layers.items():
        # transformers' Conv1D (GPT-2) stores its weight as (in, out): fan_in_fan_out is set automatically
        is_conv1d = type(layer.get_base_layer()).__name__ == "Conv1D"
        assert getattr(layer, "fan_in_fan_out", False) is is_conv1d, name
        expected_keys.add(f"{name}.gsoft_in.skew")
        assert tuple(layer.gsoft_in["default"].skew.shape) == expected_skew_shape(config, layer.in_features)
        if double:
            expected_keys.add(f"{name}.gsoft_out.skew")
            assert tuple(layer.gsoft_out["default"].skew.shape) == expected_skew_shape(config, layer.out_features)
        else:
            assert "default" not in layer.gsoft_out
        if config.scaling:
            expected_keys.add(f"{name}.gsoft_scale")
            assert layer.gsoft_scale["default"].shape == (layer.out_features,)
        else:
            assert "default" not in layer.gsoft_scale

    state_dict = get_peft_model_state_dict(model)
    gsoft_keys = {key for key in state_dict if "gsoft_" in key}
    assert gsoft_keys == expected_keys
    other_keys = set(state_dict) - gsoft_keys
    m2s = {strip(name) for name in modules_to_save_names(model)}
    expected_other = {
        f"base_model.model.{mod}.{key}" for mod in m2s for key in base.get_submodule(mod).state_dict()
    }
    assert other_keys == expected_other


@case_and_double()
def test_save_and_load_round_trip(case: Case, double: bool, tmp_path) -> None:
    inputs = case.inputs()
    model = make_peft(case, double)
    expected = run(model, inputs)
    model.save_pretrained(tmp_path)

    with open(tmp_path / "adapter_config.json") as f:
        saved_config = json.load(f)
    assert saved_config["peft_type"] == "GSOFT"
    assert saved_config["double"] is double

    saved = load_file(tmp_path / "adapter_model.safetensors")
    m2s = tuple(f"base_model.model.{strip(name)}." for name in modules_to_save_names(model))
    assert saved, "nothing saved"
    for key in saved:
        assert "gsoft_" in key or key.startswith(m2s), f"unexpected key in the adapter file: {key}"
    state_dict = get_peft_model_state_dict(model)
    assert set(saved) == set(state_dict)
    for key, value in saved.items():
        torch.testing.assert_close(value, state_dict[key], atol=0, rtol=0)

    loaded = PeftModel.from_pretrained(case.build(), tmp_path)
    assert isinstance(loaded.base_model, GSOFTModel)
    loaded_config = loaded.peft_config["default"]
    for field in ("block_size", "n_blocks", "n_factors", "double", "scaling", "orthogonal_map"):
        assert getattr(loaded_config, field) == getattr(model.peft_config["default"], field), field
    # loaded for inference: nothing trainable
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(run(loaded, inputs), expected, atol=0, rtol=0)

    # and into a trainable model
    loaded = PeftModel.from_pretrained(case.build(), tmp_path, is_trainable=True)
    assert all(p.requires_grad for n, p in loaded.named_parameters() if "gsoft_" in n)
    torch.testing.assert_close(run(loaded, inputs), expected, atol=0, rtol=0)


@case_and_double()
def test_merge_matches_unmerged_forward(case: Case, double: bool) -> None:
    inputs = case.inputs()
    model = make_peft(case, double)
    unmerged = run(model, inputs)
    before = base_weights(model)

    model.merge_adapter()
    layers = gsoft_layers(model)
    assert all(layer.merged_adapters == ["default"] for layer in layers.values())
    for name, weight in base_weights(model).items():
        assert_not_close(weight, before[name], rel=1e-4)
    torch.testing.assert_close(run(model, inputs), unmerged, **MERGE)


@case_and_double()
def test_merge_fp16_base_model(case: Case, double: bool) -> None:
    adapter = get_peft_model_state_dict(make_peft(case, double))

    base16 = case.build().to(torch.float16)
    model16 = get_peft_model(base16, make_config(case, double=double, init_weights=True))
    # get_peft_model's autocast_adapter_dtype keeps adapter weights in float32
    assert all(p.dtype == torch.float32 for n, p in model16.named_parameters() if "gsoft_" in n)
    set_peft_model_state_dict(model16, adapter)
    # reference: the same fp16-rounded base weights, merged in float32
    reference = get_peft_model(case.build().to(torch.float16).float(), make_config(case, double=double))
    set_peft_model_state_dict(reference, adapter)

    model16.merge_adapter()
    reference.merge_adapter()
    merged16, merged32 = base_weights(model16), base_weights(reference)
    assert merged16.keys() == merged32.keys()
    for name, weight in merged16.items():
        assert weight.dtype == torch.float16, name
        # the merge is computed in float32 and rounded once: at most an ulp away from the float32 result
        torch.testing.assert_close(weight, merged32[name].to(torch.float16), msg=lambda m, name=name: f"{name}: {m}")
    # nothing else in the base model changed dtype
    assert all(p.dtype == torch.float16 for n, p in base16.named_parameters() if "gsoft_" not in n)


@case_and_double()
def test_merge_twice_does_nothing(case: Case, double: bool) -> None:
    inputs = case.inputs()
    model = make_peft(case, double)
    model.merge_adapter()
    merged_weights = base_weights(model)
    merged_out = run(model, inputs)

    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert all(layer.merged_adapters == ["default"] for layer in gsoft_layers(model).values())
    for name, weight in base_weights(model).items():
        torch.testing.assert_close(weight, merged_weights[name], atol=0, rtol=0)
    torch.testing.assert_close(run(model, inputs), merged_out, atol=0, rtol=0)


@case_and_double()
def test_safe_merge(case: Case, double: bool) -> None:
    inputs = case.inputs()
    model = make_peft(case, double)
    unmerged = run(model, inputs)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(run(model, inputs), unmerged, **MERGE)


@case_and_double()
def test_safe_merge_refuses_nan_adapter(case: Case, double: bool) -> None:
    model = make_peft(case, double)
    layers = gsoft_layers(model)
    first_name = next(iter(layers))
    side = layers[first_name].gsoft_out if double else layers[first_name].gsoft_in
    with torch.no_grad():
        side["default"].skew[0, 0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "gsoft_" not in n}

    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_adapter(safe_merge=True)
    assert not any(layer.merged for layer in layers.values())
    for n, p in model.named_parameters():
        if "gsoft_" not in n:
            torch.testing.assert_close(p, before[n], atol=0, rtol=0, msg=f"{n} changed by a refused merge")

    with pytest.raises(ValueError, match="NaN or inf"):
        model.merge_and_unload(safe_merge=True)


@case_and_double()
def test_unmerge_restores_base_weights(case: Case, double: bool) -> None:
    inputs = case.inputs()
    model = make_peft(case, double)
    unmerged_out = run(model, inputs)
    original = base_weights(model)

    model.merge_adapter()
    model.unmerge_adapter()
    assert not any(layer.merged for layer in gsoft_layers(model).values())
    for name, weight in base_weights(model).items():
        torch.testing.assert_close(
            weight, original[name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"unmerge did not restore {name}: {m}"
        )
    torch.testing.assert_close(run(model, inputs), unmerged_out, **MERGE)

    with pytest.warns(UserWarning, match="Already unmerged"):
        model.unmerge_adapter()


@case_and_double()
def test_merge_and_unload(case: Case, double: bool) -> None:
    inputs = case.inputs()
    base_type = type(case.build())
    base_keys = set(case.build().state_dict())
    model = make_peft(case, double)
    expected = run(model, inputs)

    merged = model.merge_and_unload()
    assert type(merged) is base_type
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert set(merged.state_dict()) == base_keys
    torch.testing.assert_close(run(merged, inputs), expected, **MERGE)


@case_and_double()
def test_unload_returns_base_model(case: Case, double: bool) -> None:
    inputs = case.inputs()
    base_out = run(case.build(), inputs)
    model = make_peft(case, double)
    assert_not_close(run(model, inputs), base_out)

    unloaded = model.unload()
    assert type(unloaded) is type(case.build())
    assert not any(isinstance(m, BaseTunerLayer) for m in unloaded.modules())
    assert not any("gsoft_" in key for key in unloaded.state_dict())
    torch.testing.assert_close(run(unloaded, inputs), base_out, atol=0, rtol=0)


@case_and_double()
def test_disable_adapter(case: Case, double: bool) -> None:
    inputs = case.inputs()
    base_out = run(case.build(), inputs)
    model = make_peft(case, double)
    adapted = run(model, inputs)
    assert_not_close(adapted, base_out)

    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), base_out, **EXACT)
    torch.testing.assert_close(run(model, inputs), adapted, atol=0, rtol=0)

    # with a merged adapter: disabling unmerges, the output is the base output again
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), base_out, **MERGE)
    torch.testing.assert_close(run(model, inputs), adapted, **MERGE)


@case_and_double()
def test_multiple_adapters(case: Case, double: bool) -> None:
    inputs = case.inputs()
    model = make_peft(case, double)
    model.add_adapter("other", make_config(case, double=double, init_weights=False))
    out_default = run(model, inputs)

    # the inactive adapter is frozen, the active one trainable
    for name, param in model.named_parameters():
        if "gsoft_" in name:
            assert param.requires_grad == (".default" in name), name

    model.set_adapter("other")
    assert model.active_adapter == "other"
    out_other = run(model, inputs)
    assert_not_close(out_other, out_default)
    for name, param in model.named_parameters():
        if "gsoft_" in name:
            assert param.requires_grad == (".other" in name), name

    # each adapter behaves exactly like a model holding only that adapter
    for adapter, expected in (("default", out_default), ("other", out_other)):
        single = make_peft(case, double, init_weights=True)
        set_peft_model_state_dict(single, get_peft_model_state_dict(model, adapter_name=adapter))
        torch.testing.assert_close(run(single, inputs), expected, **EXACT)

    model.set_adapter("default")
    torch.testing.assert_close(run(model, inputs), out_default, atol=0, rtol=0)


@case_and_double()
def test_multiple_active_adapters_and_merge(case: Case, double: bool) -> None:
    if make_config(case).task_type is not None or make_config(case).modules_to_save:
        pytest.skip("PEFT allows only one active adapter for modules_to_save (the SEQ_CLS classifier)")
    inputs = case.inputs()
    model = make_peft(case, double)
    model.add_adapter("other", make_config(case, double=double, init_weights=False))
    out_default = run(model, inputs)
    model.set_adapter("other")
    out_other = run(model, inputs)

    for order in (["default", "other"], ["other", "default"]):
        model.base_model.set_adapter(order)
        assert all(layer.active_adapters == order for layer in gsoft_layers(model).values())
        both = run(model, inputs)
        assert_not_close(both, out_default)
        assert_not_close(both, out_other)
        # merging the active adapters (in their order) gives the same function
        model.merge_adapter()
        assert all(layer.merged_adapters == order for layer in gsoft_layers(model).values())
        torch.testing.assert_close(run(model, inputs), both, **MERGE)
        model.unmerge_adapter()
        torch.testing.assert_close(run(model, inputs), both, **MERGE)

    # merge one adapter, keep the other active on top of it
    model.base_model.set_adapter(["default", "other"])
    both = run(model, inputs)
    model.merge_adapter(["default"])
    torch.testing.assert_close(run(model, inputs), both, **MERGE)


@case_and_double()
def test_delete_adapter(case: Case, double: bool) -> None:
    inputs = case.inputs()
    model = make_peft(case, double)
    out_default = run(model, inputs)
    model.add_adapter("other", make_config(case, double=double, init_weights=False))

    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in name for name, _ in model.named_parameters())
    for layer in gsoft_layers(model).values():
        assert "other" not in layer.gsoft_settings
        assert layer.active_adapters == ["default"]
    torch.testing.assert_close(run(model, inputs), out_default, atol=0, rtol=0)

    # deleting the active adapter falls back to the remaining one
    model.add_adapter("third", make_config(case, double=double, init_weights=False))
    model.set_adapter("third")
    assert_not_close(run(model, inputs), out_default)
    with pytest.warns(UserWarning, match="third was active"):
        model.delete_adapter("third")
    assert model.active_adapters == ["default"]
    assert not any(".third" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(run(model, inputs), out_default, atol=0, rtol=0)
    assert all(p.requires_grad for n, p in model.named_parameters() if "gsoft_" in n)

    # deleting the last adapter leaves the base model's function
    model.delete_adapter("default")
    assert not any("gsoft_" in name for name, _ in model.named_parameters())
    # (PeftModel.forward itself needs an active config, so run the wrapped model)
    torch.testing.assert_close(run(model.base_model.model, inputs), run(case.build(), inputs), atol=0, rtol=0)


@case_and_double()
def test_only_adapter_parameters_are_trained(case: Case, double: bool) -> None:
    inputs = case.inputs()
    model = make_peft(case, double, init_weights=True)
    m2s = tuple(f"{name}.modules_to_save.default." for name in modules_to_save_names(model))

    def should_train(name: str) -> bool:
        return "gsoft_" in name or name.startswith(m2s)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if should_train(n)}
    assert trainable == expected
    assert any("gsoft_" in n for n in trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn(model, inputs).backward()
    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient for {name}"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    optimizer.step()

    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"trainable {name} did not change"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"


@case_and_double()
def test_training_changes_output(case: Case, double: bool) -> None:
    inputs = case.inputs()
    base_out = run(case.build(), inputs)
    model = make_peft(case, double, init_weights=True)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = loss_fn(model, inputs)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    trained = run(model, inputs)
    assert_not_close(trained, base_out)
    assert losses[-1] < losses[0]
    # the trained adapter merges like a random one
    model.merge_adapter()
    torch.testing.assert_close(run(model, inputs), trained, **MERGE)


@case_and_double()
def test_forward_bfloat16(case: Case, double: bool) -> None:
    _check_half_forward(case, double, torch.bfloat16)


@case_and_double()
def test_forward_float16(case: Case, double: bool) -> None:
    _check_half_forward(case, double, torch.float16)


def _cast_inputs(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def assert_half_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert err <= HALF_REL_TOL[dtype] * scale, f"{what}: max |diff| {err} > {HALF_REL_TOL[dtype]} * {scale}"


def _check_half_forward(case: Case, double: bool, dtype: torch.dtype) -> None:
    inputs = case.inputs()
    model32 = make_peft(case, double)
    expected = run(model32, inputs)

    model = get_peft_model(case.build().to(dtype), make_config(case, double=double, init_weights=True))
    gsoft_params = {n: p for n, p in model.named_parameters() if "gsoft_" in n}
    assert gsoft_params and all(p.dtype == torch.float32 for p in gsoft_params.values())
    set_peft_model_state_dict(model, get_peft_model_state_dict(model32))

    out = run(model, _cast_inputs(inputs, dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert_half_close(out, expected, dtype, f"{dtype} output vs float32")

    # training in half precision: adapter grads in float32
    model.train()
    loss_fn(model, _cast_inputs(inputs, dtype)).backward()
    for name, param in gsoft_params.items():
        assert param.grad is not None and param.grad.dtype == torch.float32 and torch.isfinite(param.grad).all(), name

    # merging into the half-precision weights keeps their dtype and the function (up to half-precision rounding)
    model.eval()
    model.merge_adapter()
    assert all(w.dtype == dtype for w in base_weights(model).values())
    merged = run(model, _cast_inputs(inputs, dtype))
    assert merged.dtype == dtype
    assert_half_close(merged, out, dtype, f"merged vs unmerged {dtype} output")


@case_and_double()
def test_autocast_bfloat16(case: Case, double: bool) -> None:
    inputs = case.inputs()
    model = make_peft(case, double)
    expected = run(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, inputs)
    assert torch.isfinite(out).all()
    assert_half_close(out, expected, torch.bfloat16, "autocast output vs float32")
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "gsoft_" in n)


def test_adapter_weights_in_half_precision_without_autocast() -> None:
    """autocast_adapter_dtype=False keeps bf16 adapter weights; the rotations are still built in float32."""
    case = CASES_BY_NAME["mlp"]
    inputs = _cast_inputs(case.inputs(), torch.bfloat16)
    model = get_peft_model(
        case.build().to(torch.bfloat16),
        make_config(case, double=True, init_weights=False),
        autocast_adapter_dtype=False,
    )
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "gsoft_" in n)
    unmerged = run(model, inputs)
    assert unmerged.dtype == torch.bfloat16 and torch.isfinite(unmerged).all()
    model.merge_adapter()
    assert all(w.dtype == torch.bfloat16 for w in base_weights(model).values())
    assert_half_close(run(model, inputs), unmerged, torch.bfloat16, "merged vs unmerged bf16 output")


@case_and_double()
def test_no_scaling_keeps_singular_values(case: Case, double: bool) -> None:
    model = make_peft(case, double, scaling=False, **exact_map(case))
    layers = gsoft_layers(model)
    assert not any(len(layer.gsoft_scale) for layer in layers.values())
    before = {name: weight_out_in(layer).clone() for name, layer in layers.items()}
    model.merge_adapter()
    for name, layer in layers.items():
        w0 = before[name].double().flatten(1)
        w1 = weight_out_in(layer).double().flatten(1)
        assert_not_close(w1, w0, rel=1e-4)
        torch.testing.assert_close(
            torch.linalg.svdvals(w1), torch.linalg.svdvals(w0), atol=1e-5, rtol=1e-4, msg=f"{name}: spectrum changed"
        )
    # with scaling (the default) the spectrum is free to change
    if case.config.get("scaling", True):
        scaled = make_peft(case, double, **exact_map(case))
        name, layer = next(iter(gsoft_layers(scaled).items()))
        w0 = weight_out_in(layer).double().flatten(1).clone()
        scaled.merge_adapter()
        assert_not_close(torch.linalg.svdvals(weight_out_in(layer).double().flatten(1)), torch.linalg.svdvals(w0))


# ----------------------------------------------------------------------------------------------------------------------
# The layer formula, checked against dense matrices
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double", DOUBLE_PARAMS)
@pytest.mark.parametrize(
    "case_name, layer_name",
    [("mlp", "lin1"), ("gpt2", "transformer.h.0.attn.c_attn"), ("conv", "conv0"), ("conv", "conv1")],
)
def test_layer_forward_matches_dense_formula(case_name: str, layer_name: str, double: bool) -> None:
    case = CASES_BY_NAME[case_name]
    model = make_peft(case, double, **exact_map(case))
    layer = model.base_model.model.get_submodule(layer_name)
    assert isinstance(layer, GSOFTLayer)
    base = layer.get_base_layer()
    q_in = gs.materialize(layer.gsoft_in["default"].blocks().detach())
    q_out = gs.materialize(layer.gsoft_out["default"].blocks().detach()) if double else None
    scale = layer.gsoft_scale["default"].detach() if "default" in layer.gsoft_scale else None
    torch.testing.assert_close(q_in @ q_in.T, torch.eye(q_in.shape[0]), atol=1e-5, rtol=0)

    with torch.no_grad():
        if isinstance(base, nn.Conv2d):
            x = torch.randn(3, base.in_channels, 9, 7)
            h = base._conv_forward(torch.einsum("ij,njhw->nihw", q_in, x), base.weight, None)
            if double:
                h = torch.einsum("ij,njhw->nihw", q_out, h)
            if scale is not None:
                h = h * scale.view(1, -1, 1, 1)
            expected = h + base.bias.view(1, -1, 1, 1)
        else:
            x = torch.randn(3, 5, layer.in_features)
            w = weight_out_in(layer)
            w_eff = w @ q_in
            if double:
                w_eff = q_out @ w_eff
            if scale is not None:
                w_eff = scale[:, None] * w_eff
            expected = x @ w_eff.T + base.bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Feature-specific tests
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double", DOUBLE_PARAMS)
@pytest.mark.parametrize(
    "case_name, overrides, saved_module",
    [
        ("mlp", {"modules_to_save": ["lin2"]}, "lin2"),
        ("roberta", {}, "classifier"),  # task_type="SEQ_CLS" adds the classifier head
    ],
    ids=["mlp-lin2", "roberta-seq-cls"],
)
def test_modules_to_save(case_name: str, overrides: dict, saved_module: str, double: bool, tmp_path) -> None:
    case = CASES_BY_NAME[case_name]
    inputs = case.inputs()
    model = make_peft(case, double, init_weights=True, **overrides)
    wrapper = model.base_model.model.get_submodule(saved_module)
    assert isinstance(wrapper, ModulesToSaveWrapper)
    original = {n: p.detach().clone() for n, p in wrapper.original_module.named_parameters()}
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())

    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        loss_fn(model, inputs).backward()
        optimizer.step()
    model.eval()
    for n, p in wrapper.original_module.named_parameters():
        assert torch.equal(p, original[n]), f"original {saved_module}.{n} changed"
    for n, p in wrapper.modules_to_save["default"].named_parameters():
        assert not torch.equal(p, original[n]), f"trained copy {saved_module}.{n} did not change"
    expected = run(model, inputs)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    m2s_keys = {k for k in saved if "gsoft_" not in k}
    assert m2s_keys == {f"base_model.model.{saved_module}.{n}" for n in original}
    loaded = PeftModel.from_pretrained(case.build(), tmp_path)
    torch.testing.assert_close(run(loaded, inputs), expected, atol=0, rtol=0)
    # disabling the adapter also restores the original head
    with loaded.disable_adapter():
        torch.testing.assert_close(run(loaded, inputs), run(case.build(), inputs), **EXACT)


@pytest.mark.parametrize(
    "case_name, pattern, layers, regex",
    [
        ("roberta", "layer", [1], r"roberta\.encoder\.layer\.1\.attention\.self\.(query|key|value)"),
        ("roberta", "layer", [0, 1], r"roberta\.encoder\.layer\.[01]\.attention\.self\.(query|key|value)"),
        ("gpt2", "h", 0, r"transformer\.h\.0\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"),
        ("gpt2", "h", [1], r"transformer\.h\.1\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"),
    ],
)
def test_layers_to_transform(case_name: str, pattern: str, layers, regex: str) -> None:
    case = CASES_BY_NAME[case_name]
    target_modules = ["query", "key", "value"] if case_name == "roberta" else ["c_attn", "c_proj", "c_fc"]
    base = case.build()
    model = make_peft(case, False, target_modules=target_modules, layers_to_transform=layers, layers_pattern=pattern)
    adapted = {strip(name) for name in gsoft_layers(model)}
    expected = {name for name, _ in base.named_modules() if re.fullmatch(regex, name)}
    assert expected
    assert adapted == expected


@pytest.mark.parametrize("bias", ["all", "gsoft_only"])
@pytest.mark.parametrize("case_name", ["mlp", "gpt2"])
def test_bias(case_name: str, bias: str, tmp_path) -> None:
    case = CASES_BY_NAME[case_name]
    inputs = case.inputs()
    model = make_peft(case, True, init_weights=True, bias=bias)
    adapted = set(gsoft_layers(model))
    all_biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    adapted_biases = {f"{name}.base_layer.bias" for name in adapted}
    assert adapted_biases <= all_biases and adapted_biases != all_biases
    expected_biases = all_biases if bias == "all" else adapted_biases

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "gsoft_" not in n} == expected_biases

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_fn(model, inputs).backward()
    optimizer.step()
    model.eval()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) == (name not in trainable), name
    expected = run(model, inputs)

    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k for k in saved if "gsoft_" not in k} == expected_biases  # saved under their model names
    loaded = PeftModel.from_pretrained(case.build(), tmp_path)
    torch.testing.assert_close(run(loaded, inputs), expected, atol=0, rtol=0)

    # PEFT warns that disabling cannot undo trained biases
    with pytest.warns(UserWarning, match="disabling adapter layers with bias"):
        with model.disable_adapter():
            pass


@pytest.mark.parametrize("double", DOUBLE_PARAMS)
@pytest.mark.parametrize("case_name", ["roberta", "gpt2"])
def test_gradient_checkpointing(case_name: str, double: bool) -> None:
    case = CASES_BY_NAME[case_name]
    inputs = case.inputs()
    reference = make_peft(case, double)
    state = get_peft_model_state_dict(reference)

    base = case.build()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = get_peft_model(base, make_config(case, double=double, init_weights=True))
    set_peft_model_state_dict(checkpointed, state)
    assert checkpointed.base_model.model.is_activation_checkpointing

    grads, calls = {}, {}
    for label, model in (("reference", reference), ("checkpointed", checkpointed)):
        layer = next(iter(gsoft_layers(model).values()))
        calls[label] = 0

        def count(*_, label=label):
            calls[label] += 1

        handle = layer.register_forward_pre_hook(count)
        model.train()
        loss_fn(model, inputs).backward()
        handle.remove()
        grads[label] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    # checkpointing really recomputed the forward during backward
    assert calls == {"reference": 1, "checkpointed": 2}
    assert grads["reference"].keys() == grads["checkpointed"].keys()
    for name, grad in grads["reference"].items():
        torch.testing.assert_close(grads["checkpointed"][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "case_name, double", [("mlp", False), ("mlp", True), ("conv", True)], ids=["mlp-gsoft", "mlp-double", "conv-double"]
)
def test_torch_compile(case_name: str, double: bool) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    case = CASES_BY_NAME[case_name]
    inputs = case.inputs()
    eager = make_peft(case, double)
    compiled_model = make_peft(case, double, init_weights=True)
    set_peft_model_state_dict(compiled_model, get_peft_model_state_dict(eager))
    # fullgraph: the whole PeftModel, GS rotations included, traces without graph breaks
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)

    eager.train()
    compiled_model.train()
    loss_eager = loss_fn(eager, inputs)
    loss_compiled = loss_fn(compiled, inputs)
    torch.testing.assert_close(loss_compiled, loss_eager, **EXACT)
    loss_eager.backward()
    loss_compiled.backward()
    eager_grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    compiled_grads = {n: p.grad for n, p in compiled_model.named_parameters() if p.requires_grad}
    assert eager_grads.keys() == compiled_grads.keys() and eager_grads
    for name, grad in eager_grads.items():
        assert compiled_grads[name] is not None, name
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(run(compiled, inputs), run(eager, inputs), **EXACT)
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"


@pytest.mark.parametrize("case_name", ["mlp", "unet-attn", "gpt2"])
def test_inject_adapter_in_model(case_name: str) -> None:
    case = CASES_BY_NAME[case_name]
    inputs = case.inputs()
    base_out = run(case.build(), inputs)
    config = make_config(case, init_weights=True)

    model = inject_adapter_in_model(config, case.build())
    layers = gsoft_layers(model)
    assert {name for name in layers} == {n for n, _ in case.build().named_modules() if re.fullmatch(case.targets, n)}
    torch.testing.assert_close(run(model, inputs), base_out, **EXACT)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("gsoft_" in n for n in trainable)

    random = inject_adapter_in_model(make_config(case, init_weights=False), case.build())
    assert_not_close(run(random, inputs), base_out)
    # the state dict helpers work on injected models too
    state = get_peft_model_state_dict(random)
    assert state and all("gsoft_" in key for key in state)
    set_peft_model_state_dict(model, state)
    torch.testing.assert_close(run(model, inputs), run(random, inputs), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------
def test_block_size_not_dividing_features_raises() -> None:
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_mlp_odd(), gsoft.GSOFTConfig(block_size=16, target_modules=["lin0"]))
    message = str(info.value)
    assert "block_size=16" in message and "24" in message
    assert "[2, 3, 4, 6, 8, 12, 24]" in message  # the block sizes that would fit
    assert "lin0" in message

    with pytest.raises(ValueError, match=r"n_blocks=7 .*\[1, 2, 3, 4, 6, 8, 12\]"):
        get_peft_model(tiny_mlp_odd(), gsoft.GSOFTConfig(n_blocks=7, target_modules=["lin0"], n_factors=1))


def test_double_checks_out_features() -> None:
    model = nn.Sequential(nn.Linear(16, 24))
    config = {"block_size": 16, "target_modules": ["0"], "n_factors": 1}
    get_peft_model(copy.deepcopy(model), gsoft.GSOFTConfig(**config))  # only in_features=16 is rotated
    with pytest.raises(ValueError, match=r"block_size=16 does not divide the dimension 24 for out_features=24"):
        get_peft_model(model, gsoft.GSOFTConfig(**config, double=True))


def test_too_many_factors_for_one_block_raises() -> None:
    with pytest.raises(ValueError, match="n_factors=2 needs at least 2 blocks"):
        get_peft_model(tiny_mlp(), gsoft.GSOFTConfig(block_size=16, target_modules=["lin0"], n_factors=2))


def test_target_modules_matching_nothing_raises() -> None:
    with pytest.raises(ValueError, match="not found in the base model"):
        get_peft_model(tiny_mlp(), gsoft.GSOFTConfig(block_size=4, target_modules=["does_not_exist"]))


def test_unknown_model_type_without_target_modules_raises() -> None:
    with pytest.raises(ValueError, match="No default target_modules"):
        get_peft_model(tiny_mlp(), gsoft.GSOFTConfig(block_size=4))


def test_unsupported_layer_type_raises() -> None:
    with pytest.raises(TypeError, match=r"'emb' is a Embedding, which GSOFT does not support"):
        get_peft_model(EmbeddingMLP(), gsoft.GSOFTConfig(block_size=4, target_modules=["emb", "lin0"]))


def test_grouped_conv_raises() -> None:
    with pytest.raises(ValueError, match="groups=2"):
        get_peft_model(GroupedConvNet(), gsoft.GSOFTConfig(block_size=4, target_modules=["conv0"]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 4, "n_blocks": 4}, "only one of `block_size` and `n_blocks`"),
        ({"block_size": 1}, "block_size must be an int >= 2"),
        ({"block_size": 4, "n_factors": 0}, "n_factors must be an int >= 1"),
        ({"block_size": 4, "orthogonal_map": "qr"}, "Unknown orthogonal_map"),
        ({"block_size": 4, "bias": "lora_only"}, "bias must be"),
        ({"block_size": 4, "layers_pattern": "layer"}, "only works together with `layers_to_transform`"),
    ],
)
def test_invalid_config_raises(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        gsoft.GSOFTConfig(target_modules=["lin0"], **kwargs)


def test_loading_adapter_of_other_shape_raises(tmp_path) -> None:
    model = get_peft_model(tiny_mlp(), gsoft.GSOFTConfig(block_size=4, target_modules=["lin0", "lin1"]))
    model.save_pretrained(tmp_path)
    bigger = MLP((24, 48, 16))  # block_size=4 still fits, but the skew tensors have other shapes
    match = r"GSOFT adapter does not fit this model: 'base_model\.model\.lin0\.gsoft_in\.skew' has shape \(2, 4, 6\)"
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(bigger, tmp_path)

    # a model whose sizes the saved block_size does not divide fails while building the layers, naming the layer
    other = MLP((18, 32, 16))
    match = r"block_size=4 does not divide the dimension 18 for in_features=18 of layer 'lin0'.*\[2, 3, 6, 9, 18\]"
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(other, tmp_path)



def test_defaults_work_like_peft_oft() -> None:
    """``GSOFTConfig(target_modules=...)`` needs no block size, as PEFT's OFTConfig; a width the default does not
    divide gets the same clear error as an explicit block size."""
    config = gsoft.GSOFTConfig(target_modules=["lin0", "lin1"])
    assert config.block_size == 8 and config.n_blocks is None
    model = get_peft_model(tiny_mlp(), config)  # 16 -> 32 -> 16 features
    assert {name for name in gsoft_layers(model)} == {"base_model.model.lin0", "base_model.model.lin1"}
    assert gsoft.GSOFTConfig(n_blocks=4).block_size is None
    with pytest.raises(ValueError, match=r"block_size=8 does not divide the dimension 20.*Block sizes that would"):
        get_peft_model(MLP((20, 32, 16)), gsoft.GSOFTConfig(target_modules=["lin0"]))
