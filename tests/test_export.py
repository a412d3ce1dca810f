"""Exporting GSOFT adapters (gsoft/export.py, recipes/export_adapter.py) on tiny models built from configs.

Covers: the merged transformers checkpoint loads with plain transformers and gives the PEFT model's output (GSOFT and
Double GSOFT with scaling, a trained head); several adapters (the active ones are merged); the merged UNet saved and
reloaded equals the merged weights; the weight-difference file's keys map onto every adapted UNet module (Linear and
Conv2d) as the loaders map them, and ``W + diff`` gives the merged weights exactly except where no float32 can (those
are counted, checked to have no exact float nearby, and bounded); a float16 base is exact everywhere; the user's model
is left as it was; the script end to end on a tiny pipeline directory and a transformers model; bad input errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open

import gsoft
from conftest import mlp_inputs, model_output, tiny_mlp, tiny_roberta, tiny_unet, token_inputs, unet_inputs
from gsoft import export
from gsoft.tuner import GSOFTLayer

import export_adapter
from common import dreambooth_tiny
from common.diffusion import load_adapter

EPS32 = torch.finfo(torch.float32).eps
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"the export changed the user's model: {changed[:3]}"
    assert not any(m.merged for m in model.modules() if isinstance(m, GSOFTLayer)), "the user's model was left merged"


def _adapted_unet(dtype: torch.dtype = torch.float32) -> PeftModel:
    """The tiny UNet with trained-like (random, non-identity) Double GSOFT rotations and scales on attention
    projections (Linear) and resnet convolutions (Conv2d)."""
    config = gsoft.GSOFTConfig(block_size=4, target_modules=UNET_TARGETS, double=True, init_weights=False)
    return get_peft_model(tiny_unet().to(dtype), config)


# -- merged checkpoints -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double", [False, True], ids=["gsoft", "double_gsoft"])
def test_merged_transformers_checkpoint_loads_plain_and_matches_peft(tmp_path: Path, double: bool) -> None:
    from transformers import AutoModelForSequenceClassification

    config = gsoft.GSOFTConfig(block_size=8, double=double, scaling=True, init_weights=False, task_type="SEQ_CLS")
    model = get_peft_model(tiny_roberta(), config).eval()
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].dense.weight.mul_(1.5)  # a trained head
    inputs = token_inputs()
    before = _snapshot(model)
    with torch.no_grad():
        expected = model_output(model, inputs)
    export.save_merged(model, tmp_path / "merged")
    _assert_unchanged(model, before)
    assert not list(tmp_path.glob(".merged.*")), "the temporary directory was left behind"
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert set(loaded.state_dict()) == set(tiny_roberta().state_dict())  # plain keys: no base_layer, no gsoft_*
    assert "gsoft" not in (tmp_path / "merged" / "config.json").read_text().lower()
    with torch.no_grad():
        got = model_output(loaded, inputs)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    base_out = model_output(tiny_roberta(), inputs)
    assert (got - base_out).abs().max() > 1e-3, "the adapter changed nothing: the test could not fail"


def test_merged_state_dict_merges_the_active_adapters() -> None:
    config = dict(block_size=8, init_weights=False, target_modules=["lin0", "lin1"])
    torch.manual_seed(1)
    model = get_peft_model(tiny_mlp(), gsoft.GSOFTConfig(**config), adapter_name="a")
    model.add_adapter("b", gsoft.GSOFTConfig(**config))
    x = mlp_inputs()["X"]
    for active in (["b"], ["a", "b"]):
        model.base_model.set_adapter(active)
        with torch.no_grad():
            expected = model(x)
        merged = tiny_mlp()
        merged.load_state_dict(export.merged_state_dict(model))
        torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    only_a = tiny_mlp()
    only_a.load_state_dict(export.merged_state_dict(model))
    assert not torch.allclose(only_a(x), tiny_mlp()(x)), "the adapters changed nothing"


def test_merged_unet_saved_and_reloaded_equals_merged_weights(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    model = _adapted_unet()
    before = _snapshot(model)
    merged = export.merged_state_dict(model)
    export.save_merged(model, tmp_path / "unet")
    _assert_unchanged(model, before)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet").state_dict()
    assert reloaded.keys() == merged.keys()
    assert all(torch.equal(reloaded[k], merged[k]) for k in merged)
    with torch.no_grad():
        expected = model_output(model, unet_inputs())
        got = model_output(UNet2DConditionModel.from_pretrained(tmp_path / "unet"), unet_inputs())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# -- weight difference --------------------------------------------------------------------------------------------------
def _loader_modules(model: torch.nn.Module, prefix: str) -> dict[str, torch.nn.Module]:
    """The name -> module map of the loaders (LyCORIS' create_network_from_weights, ComfyUI's diffusers key map):
    ``<prefix>_<named_modules() name with '.' -> '_'>``."""
    return {f"{prefix}_{name}".replace(".", "_"): module for name, module in model.named_modules()}


def test_weight_diff_keys_map_onto_every_adapted_unet_module() -> None:
    model = _adapted_unet()
    before = _snapshot(model)
    tensors = export.weight_diff_state_dict(model)
    _assert_unchanged(model, before)
    plain = tiny_unet()
    modules = _loader_modules(plain, "lora_unet")
    adapted = {n for n, m in model.get_base_model().named_modules() if isinstance(m, GSOFTLayer)}
    assert {k.removesuffix(".diff") for k in tensors} == {export.diff_key("lora_unet", n) for n in adapted}
    kinds = set()
    for key, diff in tensors.items():
        assert key.endswith(".diff") and not key.endswith(".diff_b")  # merging never changes the bias
        module = modules[key.removesuffix(".diff")]
        assert diff.shape == module.weight.shape and diff.dtype == torch.float32
        kinds.add(type(module).__name__)
    assert kinds == {"Linear", "Conv2d"}


def test_base_plus_diff_reproduces_merged_weights_where_a_float32_can() -> None:
    model = _adapted_unet()
    merged = export.merged_state_dict(model)
    plain = tiny_unet()
    modules = _loader_modules(plain, "lora_unet")
    names = {id(m): n for n, m in plain.named_modules()}
    inexact = total = naive_inexact = 0
    for key, diff in export.weight_diff_state_dict(model).items():
        module = modules[key.removesuffix(".diff")]
        w, m = module.weight.detach(), merged[f"{names[id(module)]}.weight"]
        got = w + 1.0 * diff  # what the loaders compute, in float32
        off = got != m
        naive_inexact += int(((w + (m - w)) != m).sum())
        inexact, total = inexact + int(off.sum()), total + m.numel()
        # where it is not exact, no float32 within two steps of the chosen diff is
        d = diff[off]
        for direction in (float("inf"), float("-inf")):
            step = d
            for _ in range(2):
                step = torch.nextafter(step, torch.full_like(step, direction))
                assert not ((w[off] + step) == m[off]).any()
        bound = 1.5 * EPS32 * torch.maximum(w.abs(), m.abs()) * (1 + EPS32)
        assert ((got - m).abs() <= bound).all()
    # trained-like rotations of a float32 base: a part of the entries has no exact float32 diff (docs/export.md)
    assert 0 < inexact <= naive_inexact < total


def test_float16_base_is_reproduced_exactly(tmp_path: Path) -> None:
    model = _adapted_unet(torch.float16)
    merged = export.merged_state_dict(model)
    stats = export.save_weight_diff(model, tmp_path / "d.safetensors")
    assert stats.inexact == 0 and stats.max_error == 0.0 and stats.tensors > 0
    plain = tiny_unet().half()
    modules = _loader_modules(plain, "lora_unet")
    names = {id(m): n for n, m in plain.named_modules()}
    with safe_open(tmp_path / "d.safetensors", "pt") as f:
        for key in f.keys():
            module = modules[key.removesuffix(".diff")]
            # ComfyUI: add in float32, cast back to the weight's dtype
            got = (module.weight.detach().float() + f.get_tensor(key)).half()
            assert torch.equal(got, merged[f"{names[id(module)]}.weight"])


def test_save_weight_diff_file(tmp_path: Path) -> None:
    model = _adapted_unet()
    path = tmp_path / "gsoft.safetensors"
    stats = export.save_weight_diff(model, path)
    with safe_open(path, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
        assert all(torch.equal(f.get_tensor(k), v) for k, v in export.weight_diff_state_dict(model).items())
    assert metadata["ss_network_module"] == "lycoris.kohya" and json.loads(metadata["ss_network_args"]) == {"algo": "full"}
    assert stats.tensors == len(keys) and stats.elements == sum(m.weight.numel() for m in model.modules()
                                                                  if isinstance(m, GSOFTLayer))
    assert list(tmp_path.iterdir()) == [path], "a temporary file was left behind"
    with pytest.raises(FileExistsError, match="overwrite"):
        export.save_weight_diff(model, path)
    assert export.save_weight_diff(model, path, dtype=torch.float16, overwrite=True).inexact > stats.inexact


def test_library_errors(tmp_path: Path) -> None:
    model = _adapted_unet()
    with pytest.raises(ValueError, match="prefix must be"):
        export.weight_diff_state_dict(model, prefix="lora.unet")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export.save_weight_diff(model, tmp_path / "d.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.save_weight_diff(model, tmp_path / "missing" / "d.safetensors")
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        export.merged_model(tiny_unet())
    model.base_model.merge_adapter()
    with pytest.raises(ValueError, match="is merged with adapters"):
        export.weight_diff_state_dict(model)
    trained_bias = get_peft_model(tiny_mlp(), gsoft.GSOFTConfig(block_size=8, target_modules=["lin0"], bias="all"))
    with pytest.raises(ValueError, match="trained biases"):
        export.weight_diff_state_dict(trained_bias)
    base = tiny_mlp()
    model = get_peft_model(base, gsoft.GSOFTConfig(block_size=8, target_modules=["lin0"]))
    with model.disable_adapter(), pytest.raises(ValueError, match="disabled"):
        export.weight_diff_state_dict(model)


# -- the script ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD pipeline directory and a recipes/dreambooth.py-style output with UNet and text-encoder adapters."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root = tmp_path_factory.mktemp("export")
    base = dreambooth_tiny.build_tiny_sd(root / "sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    unet_config = gsoft.GSOFTConfig(block_size=8, target_modules=UNET_TARGETS, double=True, init_weights=False)
    get_peft_model(unet, unet_config).save_pretrained(root / "run" / "unet")
    get_peft_model(text_encoder, gsoft.GSOFTConfig(block_size=8, init_weights=False)).save_pretrained(
        root / "run" / "text_encoder")
    return {"base": base, "run": root / "run", "root": root}


def _peft_merged_pipeline(base: Path, run: Path):
    from diffusers import StableDiffusionPipeline

    return load_adapter(StableDiffusionPipeline.from_pretrained(base), run, merge=True)


def test_script_exports_a_pipeline_both_ways(pipeline_run: dict[str, Path], capsys) -> None:
    from diffusers import StableDiffusionPipeline

    base, run, root = pipeline_run["base"], pipeline_run["run"], pipeline_run["root"]
    out = export_adapter.main(["--base", str(base), "--adapter", str(run), "--format", "diff",
                               "--output", str(root / "dog.safetensors")])
    assert re.search(r"\d+ of \d+ entries", capsys.readouterr().out)
    reference = _peft_merged_pipeline(base, run)
    plain = StableDiffusionPipeline.from_pretrained(base)
    modules = {**_loader_modules(plain.unet, "lora_unet"),
               # the loaders' text-encoder names keep transformers 4's text_model submodule
               **{k.replace("lora_te_", "lora_te_text_model_", 1): v
                  for k, v in _loader_modules(plain.text_encoder, "lora_te").items()}}
    prefixes = set()
    with safe_open(out, "pt") as f:
        for key in f.keys():
            prefixes.add(key.split("_")[1])
            module = modules[key.removesuffix(".diff")]
            module.weight.data += f.get_tensor(key)
    assert prefixes == {"unet", "te"}
    for name in ("unet", "text_encoder"):
        got, want = getattr(plain, name).state_dict(), getattr(reference, name).state_dict()
        worst = max(float((got[k] - want[k]).abs().max()) for k in want)
        assert 0 < worst <= 4 * EPS32  # a float32 base: exact but for the entries no float32 diff reaches

    merged_dir = export_adapter.main(["--base", str(base), "--adapter", str(run), "--format", "merged",
                                      "--output", str(root / "merged")])
    loaded = StableDiffusionPipeline.from_pretrained(merged_dir)
    for name in ("unet", "text_encoder"):
        got, want = getattr(loaded, name).state_dict(), getattr(reference, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_script_exports_a_transformers_model(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    base = tiny_roberta()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, gsoft.GSOFTConfig(block_size=8, init_weights=False, task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model_output(model.eval(), token_inputs())
    out = export_adapter.main(["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                               "--format", "merged", "--output", str(tmp_path / "merged")])
    with torch.no_grad():
        got = model_output(AutoModelForSequenceClassification.from_pretrained(out).eval(), token_inputs())
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def _script_error(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        export_adapter.main(argv)
    return str(info.value.code)


def test_script_errors(pipeline_run: dict[str, Path], tmp_path: Path) -> None:
    base, run = str(pipeline_run["base"]), str(pipeline_run["run"])
    ok = ["--base", base, "--adapter", run]
    assert "--adapter" in _script_error(["--base", base, "--adapter", str(tmp_path / "nope"), "--format", "diff",
                                         "--output", str(tmp_path / "d.safetensors")])
    assert "not one of merged, diff" in _script_error([*ok, "--format", "lora", "--output", str(tmp_path / "x")])
    assert "--format None: required" in _script_error([*ok, "--output", str(tmp_path / "x")])
    (tmp_path / "exists.safetensors").write_bytes(b"")
    message = _script_error([*ok, "--format", "diff", "--output", str(tmp_path / "exists.safetensors")])
    assert message.startswith("export_adapter: error: --output") and "--overwrite" in message
    assert ".safetensors" in _script_error([*ok, "--format", "diff", "--output", str(tmp_path / "d.bin")])
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    message = _script_error(["--base", base, "--adapter", str(lora), "--format", "diff",
                             "--output", str(tmp_path / "d.safetensors")])
    assert "peft_type 'LORA'" in message and "GSOFT" in message
    message = _script_error(["--base", str(tmp_path), "--adapter", str(lora), "--format", "diff",
                             "--output", str(tmp_path / "d.safetensors")])
    assert "--format diff:" in message and "--format merged" in message
