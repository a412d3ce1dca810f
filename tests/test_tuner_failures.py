"""What the GSOFT tuner does with bad input and failed operations: a clear error (or a documented warning), and the
model left in a consistent state.

* ``layers_to_transform`` with the default targets and with explicit regex targets;
* merging and unmerging that cannot succeed (a zero magnitude entry, non-finite results);
* adapter files with non-floating or non-finite tensors, or tensors the config has no place for;
* config values of the wrong type or beyond sensible sizes;
* ``orthogonal_map='cayley_neumann'`` outside the range where its series converges.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from conftest import mlp_inputs, tiny_mlp, tiny_roberta, token_inputs
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

import gsoft
from gsoft import gs
from gsoft.tuner import TARGET_MODULES_MAPPING, GSOFTLayer, GSOrthogonal

pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning"),
]


def gsoft_layers(model: nn.Module) -> dict[str, GSOFTLayer]:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, GSOFTLayer)}


@torch.no_grad()
def run(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return (out if isinstance(out, torch.Tensor) else out.logits).detach().clone()


# ----------------------------------------------------------------------------------------------------------------------
# layers_to_transform
# ----------------------------------------------------------------------------------------------------------------------
_ROBERTA_LAYER_MODULES = {
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense",
}


def test_layers_to_transform_with_default_targets(tmp_path) -> None:
    config = gsoft.GSOFTConfig(block_size=4, layers_to_transform=[0], layers_pattern="layer", task_type="SEQ_CLS")
    model = get_peft_model(tiny_roberta(), config)
    adapted = set(gsoft_layers(model))
    assert adapted == {f"roberta.encoder.layer.0.{name}" for name in _ROBERTA_LAYER_MODULES}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [0]
    loaded = PeftModel.from_pretrained(tiny_roberta(), tmp_path)
    assert set(gsoft_layers(loaded)) == adapted


def test_default_targets_are_module_names() -> None:
    """Every default is a list of names, so that ``layers_to_transform`` applies to it (PEFT ignores it for a regex)."""
    for model_type, targets in TARGET_MODULES_MAPPING.items():
        assert isinstance(targets, list) and all(isinstance(t, str) for t in targets), model_type


@pytest.mark.parametrize("field", [{"layers_to_transform": [0]}, {"layers_to_transform": 1, "layers_pattern": "h"}])
def test_regex_targets_with_layers_to_transform_raise(field: dict) -> None:
    with pytest.raises(ValueError, match=r"layers_to_transform.*cannot be combined with a regex `target_modules`"):
        gsoft.GSOFTConfig(block_size=4, target_modules=r".*\.query", **field)


def test_all_linear_with_layers_to_transform_raises() -> None:
    """PEFT turns 'all-linear' into full module names, which it matches without looking at layers_to_transform."""
    with pytest.raises(ValueError, match=r"cannot be combined with a regex `target_modules` or 'all-linear'"):
        gsoft.GSOFTConfig(block_size=4, target_modules="all-linear", layers_to_transform=[1], layers_pattern="layer")


# ----------------------------------------------------------------------------------------------------------------------
# Merging and unmerging
# ----------------------------------------------------------------------------------------------------------------------
def _mlp_model(**kwargs) -> nn.Module:
    config = gsoft.GSOFTConfig(block_size=4, target_modules=["lin0", "lin1"], init_weights=False, **kwargs)
    return get_peft_model(tiny_mlp(), config)


def test_failed_unmerge_leaves_the_layer_merged() -> None:
    inputs = mlp_inputs()
    model = _mlp_model()
    layer = gsoft_layers(model)["lin0"]
    with torch.no_grad():
        layer.gsoft_scale["default"][3] = 0.0
    unmerged_out = run(model, inputs)
    other = gsoft_layers(model)["lin1"]
    other_base = other.get_base_layer().weight.detach().clone()
    model.merge_adapter()
    merged_weight = layer.get_base_layer().weight.detach().clone()
    merged_out = run(model, inputs)
    torch.testing.assert_close(merged_out, unmerged_out, atol=2e-5, rtol=2e-4)

    with pytest.raises(ValueError, match=r"Cannot unmerge adapter 'default' from layer 'lin0': .*scale.*index 3"):
        model.unmerge_adapter()
    # still consistently merged: the weight, the bookkeeping and the forward
    assert layer.merged_adapters == ["default"] and layer.merged
    assert torch.equal(layer.get_base_layer().weight, merged_weight)
    torch.testing.assert_close(run(model, inputs), merged_out, atol=0, rtol=0)
    # disabling needs an unmerge: the same clear error, never the merged weight as "the base model"
    with pytest.raises(ValueError, match="Cannot unmerge adapter 'default'"):
        with model.disable_adapter():
            run(model, inputs)
    assert layer.merged_adapters == ["default"]
    torch.testing.assert_close(run(model, inputs), merged_out, atol=0, rtol=0)
    # the other layer unmerged before lin0 failed, or not at all: its bookkeeping matches its weight either way
    assert other.merged == (not torch.equal(other.get_base_layer().weight, other_base))


def test_unmerge_with_non_finite_result_leaves_the_layer_merged() -> None:
    model = _mlp_model()
    layer = gsoft_layers(model)["lin0"]
    model.merge_adapter()
    merged_weight = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.gsoft_scale["default"][5] = 1e-44  # dividing the merged row by it overflows float32
    with pytest.raises(ValueError, match=r"Cannot unmerge adapter 'default' from layer 'lin0'.*NaN or inf"):
        layer.unmerge()
    assert layer.merged_adapters == ["default"]
    assert torch.equal(layer.get_base_layer().weight, merged_weight)


def test_unmerge_with_singular_rotation_leaves_the_layer_merged() -> None:
    """cayley_neumann with 4 terms maps a 2 x 2 block of norm 1 to zero: the merge erases the weight."""
    config = gsoft.GSOFTConfig(block_size=2, n_factors=1, target_modules=["lin0"], orthogonal_map="cayley_neumann",
                               neumann_terms=4, scaling=False)
    model = get_peft_model(tiny_mlp(), config)
    layer = gsoft_layers(model)["lin0"]
    with torch.no_grad():
        layer.gsoft_in["default"].skew.fill_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the merge itself is allowed; its range warning is tested below
        model.merge_adapter()
    merged_weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match=r"Cannot unmerge adapter 'default' from layer 'lin0': a rotation block is singular"):
        model.unmerge_adapter()
    assert layer.merged_adapters == ["default"]
    assert torch.equal(layer.get_base_layer().weight, merged_weight)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_with_non_finite_result_changes_nothing(safe_merge: bool) -> None:
    inputs = mlp_inputs()
    model = _mlp_model()
    layer = gsoft_layers(model)["lin1"]
    with torch.no_grad():
        layer.gsoft_scale["default"][0] = float("inf")
    base_weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError, match=r"NaN or inf in the merged weight of adapter 'default' in layer 'lin1'"):
        layer.merge(safe_merge=safe_merge)
    assert not layer.merged and layer.merged_adapters == []
    assert torch.equal(layer.get_base_layer().weight, base_weight)
    with model.disable_adapter():
        torch.testing.assert_close(run(model, inputs), run(tiny_mlp(), inputs), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Adapter files
# ----------------------------------------------------------------------------------------------------------------------
def _saved_adapter(tmp_path, **kwargs):
    model = _mlp_model(**kwargs)
    model.save_pretrained(tmp_path)
    return tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.int64])
def test_adapter_with_non_floating_tensor_is_refused(tmp_path, dtype: torch.dtype) -> None:
    weights, _ = _saved_adapter(tmp_path)
    tensors = load_file(weights)
    key = "base_model.model.lin0.gsoft_in.skew"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, weights)
    match = rf"'{re.escape(key)}' has dtype {re.escape(str(dtype))}.*floating"
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(tiny_mlp(), tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_adapter_with_non_finite_tensor_is_refused(tmp_path, value: float) -> None:
    weights, _ = _saved_adapter(tmp_path)
    tensors = load_file(weights)
    key = "base_model.model.lin1.gsoft_scale"
    tensors[key][2] = value
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=rf"'{re.escape(key)}' holds NaN or inf"):
        PeftModel.from_pretrained(tiny_mlp(), tmp_path)


@pytest.mark.parametrize(
    "saved, field, key",
    [
        ({"scaling": True}, "scaling", "base_model.model.lin0.gsoft_scale"),
        ({"double": True}, "double", "base_model.model.lin0.gsoft_out.skew"),
    ],
)
def test_adapter_tensor_the_config_cannot_hold_is_refused(tmp_path, saved: dict, field: str, key: str) -> None:
    _, config_path = _saved_adapter(tmp_path, **saved)
    config = json.loads(config_path.read_text())
    config[field] = False
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"'{re.escape(key)}'.*{field}=False"):
        PeftModel.from_pretrained(tiny_mlp(), tmp_path)


def test_adapter_tensor_of_untargeted_layer_is_refused(tmp_path) -> None:
    _, config_path = _saved_adapter(tmp_path)
    config = json.loads(config_path.read_text())
    config["target_modules"] = ["lin0"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'base_model\.model\.lin1\.gsoft_in\.skew'.*target_modules"):
        PeftModel.from_pretrained(tiny_mlp(), tmp_path)


def test_set_peft_model_state_dict_checks_too() -> None:
    source = _mlp_model()
    state = get_peft_model_state_dict(source)
    state["base_model.model.lin0.gsoft_in.skew"] = state["base_model.model.lin0.gsoft_in.skew"].clone().fill_(float("nan"))
    target = _mlp_model()
    before = {k: v.clone() for k, v in get_peft_model_state_dict(target).items()}
    with pytest.raises(ValueError, match="holds NaN or inf"):
        set_peft_model_state_dict(target, state)
    after = get_peft_model_state_dict(target)
    assert all(torch.equal(after[k], v) for k, v in before.items()), "a refused load changed the model"


def test_load_adapter_with_intact_file_still_works(tmp_path) -> None:
    inputs = mlp_inputs()
    model = _mlp_model()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_mlp(), tmp_path)
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["double", "scaling", "fan_in_fan_out", "init_weights", "inference_mode"])
@pytest.mark.parametrize("value", ["false", 1, None])
def test_bool_fields_refuse_other_types(field: str, value) -> None:
    with pytest.raises(ValueError, match=rf"{field} must be True or False, got {re.escape(repr(value))}"):
        gsoft.GSOFTConfig(block_size=4, target_modules=["lin0"], **{field: value})


def test_n_factors_beyond_any_use_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match=r"n_factors=1000000000 .*at most 64.*'auto'"):
        gsoft.GSOFTConfig(block_size=4, target_modules=["lin0"], n_factors=10**9)


def test_n_factors_beyond_a_dense_rotation_is_refused_per_layer() -> None:
    # 16 features in blocks of 4: a dense 16 x 16 rotation has 120 free parameters, one factor 24, so at most 5
    with pytest.raises(ValueError, match=r"n_factors=6 .*in_features=16 of layer 'lin0'.*n_factors <= 5"):
        get_peft_model(tiny_mlp(), gsoft.GSOFTConfig(block_size=4, target_modules=["lin0"], n_factors=6))
    get_peft_model(tiny_mlp(), gsoft.GSOFTConfig(block_size=4, target_modules=["lin0"], n_factors=5))


def test_neumann_terms_is_bounded() -> None:
    with pytest.raises(ValueError, match=r"neumann_terms must be an int in \[1, 64\], got 10000000"):
        gsoft.GSOFTConfig(block_size=4, target_modules=["lin0"], neumann_terms=10**7)
    gsoft.GSOFTConfig(block_size=4, target_modules=["lin0"], neumann_terms=64)


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
@pytest.mark.parametrize("value", [123, [1, 2], ["lin0", None], {"lin0": 1}])
def test_target_modules_of_wrong_type(field: str, value) -> None:
    kwargs = {"target_modules": ["lin0"], field: value}
    with pytest.raises(ValueError, match=rf"{field} must be a list of module names or one regex string, got"):
        gsoft.GSOFTConfig(block_size=4, **kwargs)


@pytest.mark.parametrize("value", ["0", [0, "1"], [-1], True, 1.5])
def test_layers_to_transform_of_wrong_type(value) -> None:
    with pytest.raises(ValueError, match=r"layers_to_transform must be an int >= 0 or a list of them"):
        gsoft.GSOFTConfig(block_size=4, target_modules=["lin0"], layers_to_transform=value)


# ----------------------------------------------------------------------------------------------------------------------
# cayley_neumann outside its range
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _fresh_neumann_reports():
    """The range check reports each rotation once per process, by name; tests reuse names (lin0, ...)."""
    from gsoft.tuner import rotations

    rotations._NEUMANN_WARNED.clear()
    rotations._NEUMANN_PENDING.clear()
    yield


def _neumann_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, UserWarning) and "cayley_neumann" in str(w.message)]


def test_cayley_neumann_far_from_its_range_warns_once_per_layer() -> None:
    config = gsoft.GSOFTConfig(block_size=4, target_modules=["lin0", "lin1"], orthogonal_map="cayley_neumann")
    model = get_peft_model(tiny_mlp(), config)
    inputs = mlp_inputs()
    layers = gsoft_layers(model)
    with torch.no_grad():
        layers["lin0"].gsoft_in["default"].skew.fill_(0.5)  # blocks of norm ~1.4: the series diverges
        layers["lin1"].gsoft_in["default"].skew.fill_(0.01)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(model, inputs)
        with torch.no_grad():
            layers["lin0"].gsoft_in["default"].skew.mul_(1.5)  # a rebuild with lin0 still out of range
        run(model, inputs)
    messages = _neumann_warnings(record)
    assert len(messages) == 1, messages
    assert "lin0.gsoft_in.default" in messages[0] and "orthogonal_map='cayley'" in messages[0]
    assert "learning rate" in messages[0]
    norm = float(re.search(r"spectral norm up to about ([0-9.]+)", messages[0]).group(1))
    assert norm >= 1.0


def test_cayley_neumann_out_of_range_in_many_layers_is_one_warning() -> None:
    config = gsoft.GSOFTConfig(block_size=4, target_modules=["lin0", "lin1"], orthogonal_map="cayley_neumann")
    model = get_peft_model(tiny_mlp(), config)
    layers = gsoft_layers(model)
    with torch.no_grad():
        layers["lin0"].gsoft_in["default"].skew.fill_(0.5)
        layers["lin1"].gsoft_in["default"].skew.fill_(0.7)  # the worse one
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(model, mlp_inputs())
    messages = _neumann_warnings(record)
    assert len(messages) == 1, messages
    assert "lin1.gsoft_in.default' (and 1 other rotation of this model)" in messages[0]


def test_cayley_neumann_in_range_does_not_warn() -> None:
    rotation = GSOrthogonal(16, 4, 2, "cayley_neumann", 5)
    with torch.no_grad():
        rotation.skew.normal_(0.0, 0.05)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rotation(torch.randn(3, 16))
    assert _neumann_warnings(record) == []


def test_cayley_neumann_warning_when_training_diverges() -> None:
    """The issue's case: SGD with a large learning rate drives the Neumann series out of range while training."""
    torch.manual_seed(0)
    rotation = GSOrthogonal(16, 4, 2, "cayley_neumann", 5)
    rotation.name = "probe.gsoft_in.default"
    optimizer = torch.optim.SGD(rotation.parameters(), lr=50.0)
    x = torch.randn(8, 16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(5):
            optimizer.zero_grad()
            (rotation(x) - x.flip(-1)).pow(2).sum().backward()
            optimizer.step()
    messages = _neumann_warnings(record)
    assert len(messages) == 1 and "probe.gsoft_in.default" in messages[0], messages


def test_neumann_norm_bound_is_an_upper_bound() -> None:
    skew = torch.randn(3, 20, 6)
    bound = gs.skew_norm_bound(skew, 4)
    exact = torch.linalg.matrix_norm(gs.skew_symmetric(skew, 4), ord=2)
    assert bound.shape == exact.shape == (3, 20)
    assert (bound >= exact * (1 - 1e-5)).all() and (bound <= exact * 4 ** (1 / 8) * (1 + 1e-5)).all()


def test_cayley_neumann_check_in_flight_is_read_at_a_later_rebuild(monkeypatch) -> None:
    """The CUDA path's bookkeeping, on the CPU: a check whose copy has not completed is kept, read at the next rebuild
    once complete, and no second check starts while one is in flight."""
    from gsoft.tuner import rotations

    answers = iter([False, False, True])  # the first check: not done at launch, nor at the next rebuild, then done
    monkeypatch.setattr(rotations._RangeCheck, "ready", lambda self: next(answers))
    rotation = GSOrthogonal(16, 4, 2, "cayley_neumann", 5, name="deferred.gsoft_in.default")
    x = torch.randn(3, 16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with torch.no_grad():
            rotation.skew.fill_(0.5)
        rotation(x)  # launches the check: in flight
        assert _neumann_warnings(record) == [] and len(rotations._NEUMANN_PENDING) == 1
        with torch.no_grad():
            rotation.skew.mul_(1.01)
        rotation(x)  # still in flight: nothing reported, no second check
        assert _neumann_warnings(record) == [] and len(rotations._NEUMANN_PENDING) == 1
        with torch.no_grad():
            rotation.skew.mul_(1.01)
        rotation(x)  # done: reported; the rotation is warned about, so no new check starts
    messages = _neumann_warnings(record)
    assert len(messages) == 1 and "deferred.gsoft_in.default" in messages[0], messages
    assert rotations._NEUMANN_PENDING == {}
