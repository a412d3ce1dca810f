"""The fused GSOFT linear op and the shared rotation build, against dense references built with plain autograd.

The reference of a layer ``y = s * (Q_out W Q_in x) + b`` materialises ``Q`` from each rotation's own blocks
(``GSOrthogonal.blocks``, differentiable) and multiplies dense matrices, so neither the fused op's hand-written
backward nor the batched build (:mod:`gsoft.tuner.rotations`) takes part in it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

import gsoft
from gsoft import gs, plan
from gsoft.tuner import GSOFTLayer, rotations
from gsoft.tuner.layer import Linear


class Stack(nn.Module):
    """Linear layers of different widths in a row (several rotations of one group, different block counts)."""

    def __init__(self, sizes=(24, 48, 24, 36), bias: bool = True, dtype=torch.float64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias, dtype=dtype) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def make(config: dict, sizes=(24, 48, 24, 36), bias: bool = True, dtype=torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = Stack(sizes, bias, dtype)
    model = get_peft_model(base, gsoft.GSOFTConfig(target_modules=["0", "1", "2"], init_weights=False, **config))
    return model.to(dtype)


def layers(model: nn.Module) -> list[GSOFTLayer]:
    return [m for m in model.modules() if isinstance(m, GSOFTLayer)]


def dense_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's function with every adapted layer computed from dense rotation matrices (plain autograd)."""
    h = x
    stack = model.base_model.model
    for i, layer in enumerate(stack.layers):
        base = layer.get_base_layer()
        q_in = gs.materialize(layer.gsoft_in["default"].blocks())
        z = h @ q_in.T @ base.weight.T
        if "default" in layer.gsoft_out:
            z = z @ gs.materialize(layer.gsoft_out["default"].blocks()).T
        if "default" in layer.gsoft_scale:
            z = z * layer.gsoft_scale["default"]
        h = z if base.bias is None else z + base.bias
        if i < len(stack.layers) - 1:
            h = torch.tanh(h)
    return h


def grads_of(model: nn.Module, x: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    target = torch.randn(x.shape[:-1] + (36,), generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    out = forward(model, x)
    ((out - target) ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["x"] = x.grad.clone()
    grads["out"] = out.detach()
    return grads


def assert_grads_close(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


def fused(model, x):
    return model(x)


# block_size 4: 24 = 6 blocks (4 does not divide 6: "factors"), 48 = 12 (grouped), 36 = 9 (factors)
# block_size 3: 24 = 8, 48 = 16, 36 = 12 blocks, 3 | 12 only (mixed plans in one group)
@pytest.fixture(params=["cpu-rules", "dense"])
def forms(request, monkeypatch) -> str:
    """Every test with this fixture runs with the CPU's forms and with every non-grouped matrix dense (the GPU's)."""
    if request.param == "dense":
        monkeypatch.setitem(plan.DENSE_MAX, "cpu", 10**6)
    return request.param


CONFIGS = [
    pytest.param({"block_size": 4}, id="b4-m2"),
    pytest.param({"block_size": 4, "double": True}, id="b4-double"),
    pytest.param({"block_size": 4, "n_factors": 1}, id="m1"),
    pytest.param({"block_size": 4, "n_factors": 3, "scaling": False}, id="m3-noscale"),
    pytest.param({"block_size": 3, "orthogonal_map": "exp", "double": True}, id="b3-exp-double"),
    pytest.param({"n_blocks": 4, "orthogonal_map": "cayley_neumann", "double": True}, id="neumann-double"),
    pytest.param({"block_size": 4, "bias": "all"}, id="bias-trained"),
    pytest.param({"block_size": 2, "n_factors": "auto", "double": True, "scaling": False}, id="auto-double-noscale"),
]


@pytest.mark.parametrize("rows", [40, 3], ids=["weight-path", "activation-path"])
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_matches_dense_reference(config: dict, rows: int, forms: str) -> None:
    model = make(config)
    x = torch.randn(rows, 24, dtype=torch.float64)
    reference = grads_of(model, x, dense_forward)
    assert_grads_close(grads_of(model, x, fused), reference, atol=1e-10, rtol=1e-9)
    # the composed path (several adapters, compile) agrees too
    for layer in layers(model):
        layer._fused_spec = lambda adapter, x: None
    assert_grads_close(grads_of(model, x, fused), reference, atol=1e-10, rtol=1e-9)


def test_fused_op_is_used_and_builds_once_per_step(monkeypatch) -> None:
    model = make({"block_size": 4, "double": True})
    calls = {"op": 0, "build": 0}
    original_apply, original_blocks = gsoft.tuner.fused.AdaptedLinear.apply, rotations._Layout.blocks

    def count_op(*args):
        calls["op"] += 1
        return original_apply(*args)

    def count_build(self, flat):
        calls["build"] += 1
        return original_blocks(self, flat)

    monkeypatch.setattr(gsoft.tuner.fused.AdaptedLinear, "apply", count_op)
    monkeypatch.setattr(rotations._Layout, "blocks", count_build)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(40, 24, dtype=torch.float64)
    model(x).sum().backward()  # first step: rotations registered at construction build together
    opt.step()
    calls.update(op=0, build=0)
    for _ in range(3):  # gradient accumulation: three forwards and backwards, one build
        model(x).sum().backward()
    assert calls == {"op": 9, "build": 1}
    opt.step()
    model(x).sum().backward()
    assert calls["build"] == 2  # the step invalidated the cache: one more batched build, for every layer at once


def test_gradient_accumulation_and_two_forwards_one_backward() -> None:
    model = make({"block_size": 4})
    x1, x2 = torch.randn(40, 24, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]

    def total_grads(fn):
        model.zero_grad(set_to_none=True)
        fn()
        return [p.grad.clone() for p in params]

    separate = total_grads(lambda: (model(x1).sum().backward(), model(x2).sum().backward()))
    together = total_grads(lambda: (model(x1).sum() + model(x2).sum()).backward())
    reference = total_grads(lambda: (dense_forward(model, x1).sum() + dense_forward(model, x2).sum()).backward())
    for a, b, c in zip(separate, together, reference):
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-9)
        torch.testing.assert_close(b, c, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_reuses_the_build(reentrant: bool, forms: str) -> None:
    model = make({"block_size": 4, "double": True})
    x = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    stack = model.base_model.model

    def checkpointed(model, x):
        h = x
        for i, layer in enumerate(stack.layers):
            h = checkpoint(layer, h, use_reentrant=reentrant)
            if i < len(stack.layers) - 1:
                h = torch.tanh(h)
        return h

    assert_grads_close(grads_of(model, x, checkpointed), grads_of(model, x, dense_forward), atol=1e-10, rtol=1e-9)


def test_cache_follows_every_kind_of_parameter_change(forms: str) -> None:
    model = make({"block_size": 4, "double": True})
    x = torch.randn(40, 24, dtype=torch.float64)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(model(x), dense_forward(model, x), atol=1e-10, rtol=1e-9)

    check()
    skew = layers(model)[0].gsoft_in["default"].skew
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model(x).sum().backward()
    opt.step()  # optimizer step
    check()
    with torch.no_grad():
        skew.mul_(0.5)  # in-place write
    check()
    state = {k: v + 0.01 for k, v in model.state_dict().items() if "gsoft_" in k}
    model.load_state_dict(state, strict=False)  # load
    check()
    skew.data = skew.data * 0.9  # new storage
    check()
    skew.data.mul_(0.5)  # behind autograd's back: only invalidate() sees this
    rotations.invalidate()
    check()
    model.float()  # new dtype
    x = x.float()
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense_forward(model, x), atol=1e-5, rtol=1e-4)


def test_no_grad_inference_mode_and_deepcopy() -> None:
    model = make({"block_size": 4})
    x = torch.randn(40, 24, dtype=torch.float64)
    with torch.inference_mode():
        first = model(x)
    out = model(x)  # grad mode after inference mode: rebuilt as normal tensors
    out.sum().backward()
    torch.testing.assert_close(out.detach(), first)
    copy_ = copy.deepcopy(model)  # the cache lives outside the modules
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), first)
        next(p for n, p in copy_.named_parameters() if "skew" in n).add_(0.1)
        torch.testing.assert_close(model(x), first)  # the original's rotations are its own
    assert not torch.allclose(copy_(x).detach(), first)


def test_each_model_builds_only_its_own_rotations(monkeypatch) -> None:
    """Two models in one process (and a deep copy): a step of one builds all of its own rotations in one batch and
    none of the other's, so it neither pays for the other's rebuild nor keeps its graph."""
    first, second = make({"block_size": 4}), make({"block_size": 4})
    copied = copy.deepcopy(first)
    groups = [{layer.gsoft_in["default"].build_group for layer in layers(m)} for m in (first, second, copied)]
    assert all(len(g) == 1 and None not in g for g in groups)
    assert len(set.union(*groups)) == 3
    built: list[int] = []
    real = rotations._Build.apply
    monkeypatch.setattr(rotations._Build, "apply", lambda layout, *skews: built.append(len(skews)) or real(layout, *skews))
    x = torch.randn(40, 24, dtype=torch.float64)
    for model in (first, second, copied):  # every rotation of every model stale
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(x).sum().backward()
        opt.step()
    built.clear()
    first(x).sum().backward()
    assert built == [len(layers(first))]  # one build, of the first model's rotations only


def test_requires_grad_switch() -> None:
    model = make({"block_size": 4})
    x = torch.randn(40, 24, dtype=torch.float64)
    model(x).sum().backward()
    model.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    x.requires_grad_()
    model(x).sum().backward()  # the old build node must not send gradients to frozen parameters
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is not None


def test_in_place_change_of_the_output_is_a_clear_error() -> None:
    model = make({"block_size": 4})
    layer = model.base_model.model.layers[0]
    x = torch.randn(40, 24, dtype=torch.float64)
    y = layer(x)
    y.relu_()
    with pytest.raises(RuntimeError, match=r"GSOFT layer 'layers\.0'.*modified in place.*out-of-place"):
        y.sum().backward()
    # without a magnitude vector the op does not keep its output: in-place ops after it are fine
    model = make({"block_size": 4, "scaling": False})
    layer = model.base_model.model.layers[0]
    y = layer(x)
    y.relu_()
    y.sum().backward()
    assert layer.gsoft_in["default"].skew.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_float32_adapter(dtype) -> None:
    model32 = make({"block_size": 4, "double": True}, dtype=torch.float32)
    model = copy.deepcopy(model32)
    for layer in layers(model):
        layer.get_base_layer().to(dtype)
    x = torch.randn(40, 24)
    g32 = grads_of(model32, x, fused)
    g = grads_of(model, x.to(dtype), fused)
    for name, ref in g32.items():
        if name == "x":
            continue
        got = g[name].float()
        assert g[name].dtype == (dtype if name == "out" else torch.float32), name
        err = (got - ref).norm() / ref.norm()
        assert err < 0.05, f"{name}: relative error {err:.3g}"


def test_autocast_bfloat16() -> None:
    model = make({"block_size": 4, "double": True}, dtype=torch.float32)
    x = torch.randn(40, 24)
    reference = grads_of(model, x, fused)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads_of(model, x, fused)
    assert got["out"].dtype == torch.bfloat16  # like nn.Linear under autocast
    for name, ref in reference.items():
        assert got[name].dtype == (torch.bfloat16 if name == "out" else torch.float32), name
        err = (got[name].float() - ref).norm() / ref.norm()
        assert err < 0.05, f"{name}: relative error {err:.3g}"


def test_conv1d_fan_in_fan_out_layers_use_the_fused_op() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = nn.Sequential(Conv1D(48, 24).double())
    model = get_peft_model(base, gsoft.GSOFTConfig(target_modules=["0"], block_size=4, init_weights=False))
    layer = layers(model)[0]
    assert isinstance(layer, Linear) and layer.fan_in_fan_out
    x = torch.randn(40, 24, dtype=torch.float64, requires_grad=True)
    out = model(x)
    q = gs.materialize(layer.gsoft_in["default"].blocks())
    expected = (x @ q.T @ layer.get_base_layer().weight + layer.get_base_layer().bias) * layer.gsoft_scale["default"]
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-9)
    (gx,) = torch.autograd.grad(out.sum(), x)
    (ex,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(gx, ex, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("dense_max", [0, 10**6], ids=["cpu-rules", "dense"])
def test_batched_build_matches_each_rotation_alone(monkeypatch, dense_max: int) -> None:
    monkeypatch.setitem(plan.DENSE_MAX, "cpu", dense_max)
    model = make({"block_size": 3, "double": True, "orthogonal_map": "exp"})
    forms = set()
    for layer in layers(model):
        for side in (layer.gsoft_in, layer.gsoft_out):
            rotation = side["default"]
            form = rotation.form("cpu")
            forms.add(form)
            alone = plan.in_form(rotation.blocks(), form)
            torch.testing.assert_close(rotation.rotation(), alone, atol=1e-12, rtol=1e-12)
    assert forms == ({"groups", "dense"} if dense_max else {"groups", "factors"})


def test_matrix_form_rules(monkeypatch) -> None:
    assert plan.matrix_form(1, 12, 4, "cpu") == "blocks"
    assert plan.matrix_form(2, 96, 8, "cpu") == "groups"  # RoBERTa-base, b = 8
    assert plan.matrix_form(2, 48, 16, "cpu") == "factors"  # b = 16: groups of 256 only on a GPU
    assert plan.matrix_form(2, 48, 16, "cuda") == "groups"
    assert plan.matrix_form(2, 32, 10, "cpu") == "factors"  # SD UNet, 32 blocks of 10: b does not divide r
    assert plan.matrix_form(2, 32, 10, "cuda") == "dense"
    assert plan.matrix_form(2, 128, 32, "cuda") == "factors"  # n = 4096: too wide for one dense block
    assert plan.matrix_form(2, 32, 40, "cuda") == "dense"  # SD UNet's widest attention, 1280 = 32 blocks of 40
    assert plan.matrix_form(2, 32, 64, "cuda") == "factors"  # Llama-3.2-1B, b = 64: n^2 floats would cost the memory
