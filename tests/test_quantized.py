"""QGSOFT: GSOFT and Double GSOFT on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases, on the CPU build of bitsandbytes.

Every forward is checked against the dense reference (the dequantized weight merged in fp32), the fused 4-bit op
against the composed forward, the saved tensors for a dense weight copy, merging for its requantization report, and a
4-bit tiny Llama loaded through transformers for training, saving and reloading.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

import gsoft
from gsoft.tuner.quantized import Linear4bit, Linear8bitLt, QuantizedLinear

KINDS = ["nf4", "fp4", "int8"]


def quantized_linear(kind: str, n_in: int = 64, n_out: int = 48, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    dense = nn.Linear(n_in, n_out)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(n_in, n_out, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(n_in, n_out, quant_type=kind, compute_dtype=torch.float32)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.lin = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def adapted(kind: str, double: bool = False, init_weights: bool = False, gs_options: dict | None = None,
            **layer_kwargs) -> nn.Module:
    config = gsoft.GSOFTConfig(target_modules=["lin"], double=double, scaling=double, init_weights=init_weights,
                               **(gs_options or {"block_size": 16}))
    return get_peft_model(Wrap(quantized_linear(kind, **layer_kwargs)), config)


def layer_of(model: nn.Module) -> QuantizedLinear:
    layer = model.base_model.model.lin
    assert isinstance(layer, QuantizedLinear)
    return layer


@pytest.mark.parametrize("double", [False, True], ids=["gsoft", "double"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [5, 100], ids=["few_rows", "many_rows"])
def test_forward_matches_dense_reference(kind, double, rows):
    model = adapted(kind, double)
    layer = layer_of(model)
    assert isinstance(layer, Linear8bitLt if kind == "int8" else Linear4bit)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        weight = layer._dense_weight()
        reference = x @ layer._merge_one(weight, "default").T + layer.get_base_layer().bias
        if kind == "int8":  # bitsandbytes' int8 matmul also quantizes the input rows to int8
            tolerance = 2e-2 * reference.abs().max()
        else:
            tolerance = 1e-5 * reference.abs().max()
        assert (model(x) - reference).abs().max() <= tolerance


@pytest.mark.parametrize("kind", KINDS)
def test_identity_at_init(kind):
    model = adapted(kind, double=True, init_weights=True)
    x = torch.randn(20, 64)
    with torch.no_grad():
        expected = layer_of(model).get_base_layer()(x)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


# the matrix forms on a CPU: one pass per factor, dense groups, one block-diagonal factor
FORMS = {"factors": {"block_size": 16}, "groups": {"block_size": 8}, "blocks": {"block_size": 16, "n_factors": 1}}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("double", [False, True], ids=["gsoft", "double"])
@pytest.mark.parametrize("rows", [5, 100], ids=["few_rows", "many_rows"])
def test_fused_4bit_op_equals_composed_forward(double, rows, form):
    model = adapted("nf4", double, gs_options=FORMS[form])
    layer = layer_of(model)
    assert layer.gsoft_in["default"].form("cpu") == form
    x = torch.randn(rows, 64, requires_grad=True)
    g = torch.randn(rows, 48)

    def outputs(forward):
        for p in [*model.parameters(), x]:
            p.grad = None
        y = forward(x)
        (y * g).sum().backward()
        return [y.detach()] + [p.grad.clone() for p in [*model.parameters(), x] if p.grad is not None]

    assert layer._fused_spec("default", x).dense_weight is not None
    fused, composed = outputs(model), outputs(lambda t: layer._composed_forward(["default"], t))
    assert len(fused) == len(composed) == (5 if double else 3)
    for a, b in zip(fused, composed):
        torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_training_saves_no_dense_weight(kind):
    """The quantized weight is never kept dequantized: no tensor autograd saves has the weight's dense shape."""
    model = adapted(kind, double=True)
    shapes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(100, 64)  # more rows than outputs: the fused 4-bit op folds the rotations into the weight
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.sum().backward()
    assert shapes, "nothing was saved: the test no longer looks at the training forward"
    dense = [(s, d) for s, d in shapes if sorted(s) == [48, 64] and d.is_floating_point]
    assert dense == []
    base = layer_of(model).get_base_layer()
    assert not base.weight.requires_grad and base.weight.grad is None
    assert base.weight.dtype in (torch.uint8, torch.int8)
    assert {n.split(".")[-2] if "scale" in n else n.split(".")[-3] for n, p in model.named_parameters()
            if p.requires_grad} == {"gsoft_in", "gsoft_out", "gsoft_scale"}


@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_and_reports_the_error(kind):
    model = adapted(kind, double=True)
    layer = layer_of(model)
    x = torch.randn(20, 64)
    with torch.no_grad():
        exact = layer._merge_one(layer._dense_weight(), "default")
        with pytest.warns(UserWarning, match=r"GSOFT merge of 1 quantized weight\(s\) requantized the result"):
            model.merge_adapter()
        assert layer.merged and layer.get_base_layer().weight.dtype in (torch.uint8, torch.int8)
        (error,) = layer.requantization_errors
        stored = layer._dense_weight()
        assert error.operation == "merge" and error.layer == "lin" and error.adapter == "default"
        assert error.relative == pytest.approx(float((stored - exact).norm() / exact.norm()), rel=1e-5)
        assert 0 < error.relative < (0.15 if kind != "int8" else 0.01)  # one rounding to the grid, not garbage
        # the merged layer computes with the requantized weight
        merged_out = model(x)
        torch.testing.assert_close(merged_out, layer.get_base_layer()(x))
        with pytest.warns(UserWarning, match=r"GSOFT unmerge of 1 quantized weight"):
            model.unmerge_adapter()
        assert not layer.merged


def test_merge_and_unload_keeps_the_layer_quantized():
    model = adapted("nf4", double=True)
    with pytest.warns(UserWarning, match="requantized"):
        unloaded = model.merge_and_unload()
    assert type(unloaded.lin) is bnb.nn.Linear4bit
    assert unloaded.lin.weight.dtype == torch.uint8


def test_merge_after_cpu_inference_repacking():
    """bitsandbytes repacks a 4-bit CPU weight for its inference kernel (eval, no grad, AVX512-BF16 machines);
    merging afterwards reads the weight back from that layout. (Its repacking needs out_features divisible by 32 and
    stores the block scales in bfloat16, so the weight comes back within bfloat16 rounding of the scales.)"""
    model = adapted("nf4", double=False, n_out=64)
    layer = layer_of(model)
    before = layer._dense_weight().clone()
    model.eval()
    with torch.no_grad():
        layer.get_base_layer()(torch.randn(3, 64))  # bitsandbytes' own forward: may repack
        torch.testing.assert_close(layer._dense_weight(), before, atol=0, rtol=2**-8)
        with pytest.warns(UserWarning, match="requantized"):
            model.merge_adapter()


def test_8bit_with_fp16_weights_is_refused():
    layer = bnb.nn.Linear8bitLt(32, 32, has_fp16_weights=True)
    with pytest.raises(ValueError, match="has_fp16_weights=True"):
        get_peft_model(Wrap(layer), gsoft.GSOFTConfig(block_size=8, target_modules=["lin"]))


# ----------------------------------------------------------------------------------------------------------------------
# A 4-bit tiny Llama through transformers and PEFT, as QLoRA users load one
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_4bit(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map="cpu",
                                                     dtype=torch.float32)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def test_4bit_llama_trains_saves_and_reloads(llama_dir, tmp_path):
    model = get_peft_model(load_4bit(llama_dir), gsoft.GSOFTConfig(block_size=16))
    adapted_layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(adapted_layers) == 14  # 7 projections x 2 layers, every one on its 4-bit base
    # a learnable task: continue a fixed periodic token pattern
    pattern = torch.arange(8).repeat(4)
    ids = torch.stack([torch.roll(pattern, s) for s in range(4)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses  # 4.10 -> 2.94 here: a random base has little to rotate
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(load_4bit(llama_dir), tmp_path / "adapter").eval()
    assert sum(isinstance(m, Linear4bit) for m in reloaded.modules()) == 14
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
