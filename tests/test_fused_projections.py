"""q/k/v and gate/up served as one Linear each: the same outputs as the parts, no second copy."""
import pytest
import torch

from lowbit.kernels import testing
from lowbit.layers.context import AttentionContext
from lowbit.layers.linear import Linear, fuse_linears
from lowbit.models.random_weights import load_random_model
from lowbit.quant.linear_method import QuantLinearMethod, install
from lowbit.quant.formats import QuantSpec
from lowbit.quant.quantize import layer_linears

from test_kernel_path import method_for

INT8_TOKEN = QuantSpec(bits=8, granularity="channel")


def _parts(g, k, ns, bias=False):
    parts = []
    for n in ns:
        lin = Linear(k, n, bias=bias)
        lin.weight.data = testing.randn((n, k), g) * 0.05
        if bias:
            lin.bias.data = testing.randn((n,), g)
        parts.append(lin)
    return parts


@pytest.mark.parametrize("bias", [False, True])
def test_fused_16bit_linear_is_the_concatenation(bias):
    g = testing.gen()
    parts = _parts(g, 96, [64, 32, 32], bias)
    x = testing.randn((5, 96), g)
    want = torch.cat([p(x) for p in parts], -1)
    fused = fuse_linears(parts)
    assert fused is not None and fused.out_features == 128
    assert testing.rel_err(fused(x), want.double()) < 1e-6
    for p, w in zip(parts, want.split([64, 32, 32], -1)):  # the parts are views of the fused weight, same outputs
        assert p.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
        assert testing.rel_err(p(x), w.double()) < 1e-6


@pytest.mark.parametrize("fmt", ["w4a8", "w8a8-int8", "w8a8-fp8", "w4a16", "w4a16-channel", "w4a4-atom", "w4a4-rot"])
def test_fused_kernel_linear_is_the_concatenation(fmt):
    """Quantized parts on their kernels' layouts (the torch references of the kernels on the CPU)."""
    g = testing.gen()
    parts = _parts(g, 256, [128, 64, 64])
    for p in parts:
        method = method_for(fmt, p.weight.data)
        install(p, method)
        assert method.prepare_kernel()
    x = testing.randn((3, 256), g)
    want = torch.cat([p(x) for p in parts], -1)
    fused = fuse_linears(parts)
    assert fused is not None and fused.quant_method.kernel.n == 256
    assert testing.rel_err(fused(x), want.double()) < 1e-6
    for p, w in zip(parts, want.split([128, 64, 64], -1)):
        assert testing.rel_err(p(x), w.double()) < 1e-6


def test_unfusable_parts_keep_their_own_path():
    g = testing.gen()
    a, b = _parts(g, 64, [32, 32])
    method = QuantLinearMethod(None, INT8_TOKEN)
    b.quant_method = method  # one quantized part without a kernel, one 16-bit part
    assert fuse_linears([a, b]) is None
    c, d = _parts(g, 64, [32, 32])
    d.online_hadamard = True
    assert fuse_linears([c, d]) is None and fuse_linears([c]) is None
    e, f = _parts(g, 256, [32, 32])  # W4A4 parts whose inputs are gathered in different orders
    for p in (e, f):
        install(p, method_for("w4a4-atom", p.weight.data))
        assert p.quant_method.prepare_kernel()
    f.quant_method.input_perm = f.quant_method.input_perm.flip(0)
    assert fuse_linears([e, f]) is None


def test_fused_model_keeps_its_logits_and_its_state_dict():
    model, _, cfg = load_random_model("tiny", seed=int(testing.gen().initial_seed() % 2**31))
    keys = set(model.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (12,))
    positions = torch.cat([torch.arange(7), torch.arange(5)])
    ctx = AttentionContext.cacheless([7, 5], "cpu")
    with torch.inference_mode():
        want = model.compute_logits(model(ids, positions, ctx))
        model.fuse_projections()
        got = model.compute_logits(model(ids, positions, ctx))
    assert all(layer.self_attn.qkv is not None and layer.mlp.gate_up is not None for layer in model.model.layers)
    assert set(model.state_dict()) == keys  # the fused Linears are not modules of the tree
    assert testing.rel_err(got, want.double()) < 1e-5


@pytest.mark.parametrize("recipe,token_dtype", [("w4a8kv4", torch.int8), ("w8a8", torch.int8),
                                                ("fp8", torch.float8_e4m3fn)])
def test_norms_and_silu_quantize_for_the_fused_kernels(monkeypatch, recipe, token_dtype):
    """With kernel-format linears, the norms hand q/k/v and gate/up their per-token codes (rmsnorm_quant)
    and SiLU-mul hands down_proj its codes (silu_mul_quant): the same function as normalizing, then
    quantizing in the Linear (fp32 here, so the same codes)."""
    from lowbit.kernels import actquant
    from lowbit.quant.recipes import RECIPES

    model, _, cfg = load_random_model("tiny", recipe=RECIPES[recipe], seed=int(testing.gen().initial_seed() % 2**31))
    for layer in model.model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert lin.quant_method.prepare_kernel()  # the kernels' torch references on the CPU
    ids = torch.randint(0, cfg.vocab_size, (12,))
    positions = torch.cat([torch.arange(7), torch.arange(5)])
    ctx = AttentionContext.cacheless([7, 5], "cpu")
    calls = {"rmsnorm_quant": 0, "silu_mul_quant": 0}
    for name in calls:
        def counted(*a, _f=getattr(actquant, name), _n=name, **k):
            calls[_n] += 1
            return _f(*a, **k)
        monkeypatch.setattr(actquant, name, counted)
    import lowbit.layers.norm as norm
    import lowbit.models.llama as llama
    monkeypatch.setattr(llama, "silu_mul_quant", actquant.silu_mul_quant)  # the callers' own names, counted too
    monkeypatch.setattr(norm, "rmsnorm_quant", actquant.rmsnorm_quant)
    with torch.inference_mode():
        want = model.compute_logits(model(ids, positions, ctx))
        assert calls == {"rmsnorm_quant": 0, "silu_mul_quant": 0}
        model.fuse_projections()
        got = model.compute_logits(model(ids, positions, ctx))
    layers = model.model.layers
    assert all(la.attn_input == la.mlp_input == la.mlp.down_input == token_dtype for la in layers)
    assert calls == {"rmsnorm_quant": 2 * len(layers), "silu_mul_quant": len(layers)}
    assert testing.rel_err(got, want.double()) < 1e-5


def _unfused(model, ids, positions, ctx):
    """The decoder with each residual add its own op and each norm re-reading the sum (as before the
    fusion, and as HF's layer); the norms quantize for the fused kernels where the model's do."""
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        norm_in, _ = layer._norm(layer.input_layernorm, x, None, layer.attn_input)
        x = x + layer.self_attn(positions, norm_in, ctx)
        norm_in, _ = layer._norm(layer.post_attention_layernorm, x, None, layer.mlp_input)
        x = x + layer.mlp(norm_in)
    return model.model.norm(x)


class _HiddenAdds(torch.overrides.TorchFunctionMode):
    """Counts the adds whose result is `[T, hidden]` (a residual add's shape) made outside the norms."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count, self.in_norm = shape, 0, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in ("add", "add_", "__add__", "__radd__", "__iadd__") and not self.in_norm \
                and isinstance(out, torch.Tensor) and out.shape == self.shape:
            self.count += 1
        return out


@pytest.mark.parametrize("recipe,dtype", [(None, torch.bfloat16), ("w8a8", torch.float32),
                                          ("w4a8kv4", torch.float32)])
def test_residual_adds_run_inside_the_norms(monkeypatch, recipe, dtype):
    """vLLM's fused_add_rms_norm: each residual add happens inside the norm that reads the sum (rmsnorm,
    or rmsnorm_quant where it quantizes for the fused kernels; the last layer's in the final norm): no
    separate add is left, and the logits are bit-equal to the unfused computation's."""
    import lowbit.layers.norm as norm
    from lowbit.quant.recipes import RECIPES

    model, _, cfg = load_random_model("tiny", dtype=dtype, recipe=recipe and RECIPES[recipe],
                                      seed=int(testing.gen().initial_seed() % 2**31))
    if recipe:
        for layer in model.model.layers:
            for lin in layer_linears(layer).values():
                assert lin.quant_method.prepare_kernel()
    model.fuse_projections()
    layers = model.model.layers
    assert all(la.attn_input == la.mlp_input == (recipe and torch.int8) for la in layers)
    ids = torch.randint(0, cfg.vocab_size, (12,))
    positions = torch.cat([torch.arange(7), torch.arange(5)])
    ctx = AttentionContext.cacheless([7, 5], "cpu")
    adds = _HiddenAdds(torch.Size([12, cfg.hidden_size]))
    calls = {"with residual": 0, "without": 0}

    def counted(f):
        def wrapper(x, *a, **k):
            residual = k.get("residual", a[2] if len(a) > 2 else None)
            if x.shape[-1] == cfg.hidden_size:  # not q/k norms
                calls["with residual" if residual is not None else "without"] += 1
            adds.in_norm = True
            try:
                return f(x, *a, **k)
            finally:
                adds.in_norm = False
        return wrapper

    monkeypatch.setattr(norm, "rmsnorm", counted(norm.rmsnorm))
    monkeypatch.setattr(norm, "rmsnorm_quant", counted(norm.rmsnorm_quant))
    with torch.inference_mode():
        with adds:
            got = model.compute_logits(model(ids, positions, ctx))
        assert calls == {"with residual": 2 * len(layers), "without": 1}  # the first norm has no residual yet
        assert adds.count == 0
        want = model.compute_logits(_unfused(model, ids, positions, ctx))
        x = model.model.embed_tokens(ids)
        with adds:
            layers[0](positions, x, ctx)  # a layer on its own (calibration) adds its output to its input
        assert adds.count == 1
    assert torch.equal(got, want)
