"""Quantize a loaded model with a recipe: transform (rotate, smooth, reorder), then quantize layer by layer.

Calibrated recipes go through the decoder one layer at a time (as GPTQ does): the calibration
activations enter layer i already shaped by the quantized layers before it, statistics are taken,
the layer's weights are transformed and quantized, and the quantized layer produces the inputs of
layer i + 1.
"""
from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from lowbit.layers.context import AttentionContext
from lowbit.quant.calibrate import Recorder
from lowbit.quant.formats import QuantSpec, fake_quantize, quantize
from lowbit.quant.gptq import gptq_quantize
from lowbit.quant.linear_method import QuantLinearMethod, install
from lowbit.quant.progressive import dequantize_progressive, quantize_progressive
from lowbit.quant.recipes import Recipe
from lowbit.quant.reorder import permute_input, permute_output, select_outlier_channels
from lowbit.quant.rotate import (fuse_rmsnorm_into_linears, hadamard_matrix, rotate_embedding, rotate_input,
                                 rotate_output)
from lowbit.quant.rtn import rtn_quantize
from lowbit.quant.smooth import apply_smooth_attention, apply_smoothing, awq_search, smooth_attention_scales, smooth_scales

OUTLIER_WEIGHT = QuantSpec(bits=8, granularity="channel")  # Atom: outlier columns int8 per output channel
KEEP_TOKENS = 2048  # calibration tokens kept per linear for AWQ's and the clip search's output error

# the four inputs of a decoder layer; linears in one group read the same activation
GROUPS = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
          "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",)}


def layer_linears(layer) -> dict[str, torch.nn.Module]:
    return {name: layer.get_submodule(name) for names in GROUPS.values() for name in names}


def outlier_count(recipe: Recipe, k: int) -> int:
    """Atom's k, capped at a quarter of the channels so small models keep most channels in 4 bits."""
    return min(recipe.outliers, k // 4)


@torch.no_grad()
def quantize_model(model, recipe: Recipe, calib: torch.Tensor | None = None, progress: bool = True,
                   batch_size: int = 8) -> None:
    """Quantize `model` in place. `calib`: `[samples, seq_len]` token ids (needed when
    `recipe.calibrated`). Everything a checkpoint needs ends up on the layers' quant methods."""
    for attn in model.attention_layers():
        attn.kv_spec, attn.rotate_kv = recipe.kv, recipe.rotate_kv
    if recipe.rotate:
        rotate_model(model)
    if recipe.weight is None and recipe.activation is None:
        return
    layers = model.model.layers
    if not recipe.calibrated:
        for layer in tqdm(layers, desc=f"quantize {recipe.name}", disable=not progress):
            for lin in layer_linears(layer).values():
                install(lin, QuantLinearMethod(quantize_weight(lin.weight, recipe, 0), recipe.activation))
        return
    if calib is None:
        raise ValueError(f"recipe {recipe.name} needs calibration data")
    device = next(model.parameters()).device
    x = model.model.embed_tokens(calib.to(device))
    for layer in tqdm(layers, desc=f"quantize {recipe.name}", disable=not progress):
        quantize_layer(model, layer, x, recipe, batch_size)
        x = run_layer(layer, x, batch_size)


def run_layer(layer, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Apply one decoder layer, cache-less, to `x [S, L, H]` in batches of samples."""
    out = torch.empty_like(x)
    s, n = x.shape[:2]
    positions = torch.arange(n, device=x.device)
    for i in range(0, s, batch_size):
        b = x[i: i + batch_size]
        ctx = AttentionContext.cacheless([n] * b.shape[0], x.device)
        out[i: i + batch_size] = layer(positions.repeat(b.shape[0]), b.reshape(-1, b.shape[-1]), ctx).view_as(b)
    return out


def record(layer, x, batch_size, **kw) -> Recorder:
    rec = Recorder(layer_linears(layer), **kw)
    try:
        run_layer(layer, x, batch_size)
    finally:
        rec.close()
    return rec


def clips_on_samples(recipe: Recipe) -> bool:
    """Whether the weights' clip search scores candidates on kept input samples (GPTQ's own
    error feedback replaces it)."""
    return bool(recipe.clip_search) and recipe.method != "gptq"


def calibrate_layer(layer, x: torch.Tensor, recipe: Recipe, batch_size: int) -> tuple[Recorder, dict[str, torch.Tensor]]:
    """Smooth and reorder the layer as the recipe says, from one calibration pass over its inputs `x`;
    -> the statistics of each linear's inputs as its weight now sees them, and the reorder's
    permutations. Smoothing and the reorder change the recorded statistics as they change the inputs
    (exactly in arithmetic) instead of recording them again."""
    perms: dict[str, torch.Tensor] = {}
    keep = KEEP_TOKENS if recipe.smoothing == "awq" or clips_on_samples(recipe) else 0
    rec = record(layer, x, batch_size, hessian=recipe.method == "gptq", keep_tokens=keep,
                 outputs=("self_attn.k_proj",) if recipe.smooth_attention else ())
    if recipe.smoothing:
        for name, s in smooth_layer(layer, rec, recipe).items():
            rec.stats[name].rescale(s)
    if recipe.smooth_attention and not hasattr(layer.self_attn, "q_norm"):  # a k_norm would undo it
        attn = layer.self_attn
        k_absmax = rec.out_absmax["self_attn.k_proj"].view(attn.num_kv_heads, attn.head_dim)
        lam = smooth_attention_scales(k_absmax, recipe.alpha)
        q, k = attn.q_proj, attn.k_proj
        q.weight.data, k.weight.data, qb, kb = apply_smooth_attention(
            q.weight, k.weight, lam, None if q.bias is None else q.bias, None if k.bias is None else k.bias)
        if qb is not None:
            q.bias.data, k.bias.data = qb, kb
    if recipe.outliers:
        perms = reorder_layer(layer, rec, recipe)
        for name, perm in perms.items():  # x[..., perm]: gathered at run time, or (down_proj) by gate/up's rows
            rec.stats[name].permute(perm)
    return rec, perms


def quantize_layer(model, layer, x: torch.Tensor, recipe: Recipe, batch_size: int) -> None:
    rec, perms = calibrate_layer(layer, x, recipe, batch_size)
    for name, lin in layer_linears(layer).items():
        k_out = outlier_count(recipe, lin.in_features) if recipe.outliers else 0
        perm = perms.get(name)
        if perm is not None:
            lin.weight.data = permute_input(lin.weight, perm)
        st = rec.stats[name]
        hessian = st.hessian.hessian if st.hessian is not None else None
        samples = st.samples if clips_on_samples(recipe) else None  # AWQ's own samples are not a clip search
        weight = quantize_weight(lin.weight, recipe, k_out, hessian, samples)
        install(lin, QuantLinearMethod(weight, recipe.activation, k_out,
                                       perm if name not in GROUPS["down"] else None))


def smooth_layer(layer, rec: Recorder, recipe: Recipe) -> dict[str, torch.Tensor]:
    """SmoothQuant (qkv and gate/up from their norms) or AWQ (also down_proj from up_proj); returns
    each smoothed linear's scales (its input is now x / s)."""
    mlp = layer.mlp
    pairs = [(layer.input_layernorm.weight, None, GROUPS["qkv"]),
             (layer.post_attention_layernorm.weight, None, GROUPS["gate_up"])]
    if recipe.smoothing == "awq":
        pairs.append((mlp.up_proj.weight, mlp.up_proj.bias, GROUPS["down"]))
    scales = {}
    for producer, bias, names in pairs:
        consumers = [layer.get_submodule(n) for n in names]
        ws = [c.weight for c in consumers]
        st = rec.stats[names[0]]
        if recipe.smoothing == "smoothquant":
            s = smooth_scales(st.absmax, ws, recipe.alpha)
        else:
            s = awq_search(st.samples.to(ws[0].dtype), ws, lambda w: fake_weight(w, recipe))
        new_p, new_ws, new_b = apply_smoothing(producer, ws, s, bias)
        producer.data = new_p
        if bias is not None:
            bias.data = new_b
        for c, w in zip(consumers, new_ws):
            c.weight.data = w
        scales.update(dict.fromkeys(names, s))
    return scales


def reorder_layer(layer, rec: Recorder, recipe: Recipe) -> dict[str, torch.Tensor]:
    """Atom: per input group, the channels with the largest mean square go last. down_proj's order is
    folded into gate/up rows; the others are gathered at run time (fused into the producer's kernel)."""
    perms = {}
    for group, names in GROUPS.items():
        st = rec.stats[names[0]]
        perm = select_outlier_channels(st.mean_square, outlier_count(recipe, st.absmax.numel()))
        if group == "down":
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight.data = permute_output(lin.weight, perm)
                if lin.bias is not None:
                    lin.bias.data = permute_output(lin.bias, perm)
        for name in names:
            perms[name] = perm
    return perms


def segment_specs(recipe: Recipe, k: int, k_out: int) -> list[tuple[slice, QuantSpec]]:
    if not k_out:
        return [(slice(0, k), recipe.weight)]
    return [(slice(0, k - k_out), recipe.weight), (slice(k - k_out, k), OUTLIER_WEIGHT)]


def fake_weight(w: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    if recipe.progressive:
        return dequantize_progressive(quantize_progressive(w, recipe.weight.group_size), w.dtype)
    return fake_quantize(w, recipe.weight)


def quantize_weight(w: torch.Tensor, recipe: Recipe, k_out: int, hessian=None, samples=None):
    """-> a ProgressiveWeight, or [(start, stop, QTensor)] segments over the input columns."""
    if recipe.progressive:
        return quantize_progressive(w, recipe.weight.group_size, None if samples is None else samples.to(w.device))
    specs = segment_specs(recipe, w.shape[1], k_out)
    if recipe.method == "gptq" and hessian is not None:
        _, qts = gptq_quantize(w, hessian, specs, percdamp=recipe.damp, act_order=recipe.act_order,
                               clip_search=recipe.clip_search, clip_by_output=recipe.clip_by_output)
    elif samples is not None:
        qts = [rtn_quantize(w[:, sl], spec, samples[:, sl].to(w.device))[1] for sl, spec in specs]
    else:
        qts = [quantize(w[:, sl], spec) for sl, spec in specs]
    return [(sl.start, sl.stop, qt) for (sl, _), qt in zip(specs, qts)]


def rotate_model(model) -> None:
    """QuaRot: fold every RMSNorm weight into the linears after it, rotate the residual stream by a
    Hadamard matrix H (embedding and writers: W -> H^T W; readers: W -> W H), and put an online
    Hadamard before down_proj. The function is unchanged; outliers are spread over all channels."""
    cfg = model.config
    m = model.model
    if cfg.tie_word_embeddings:  # the folded final norm makes lm_head differ from the embedding
        model.lm_head.weight = torch.nn.Parameter(m.embed_tokens.weight.detach().clone(), requires_grad=False)
        model.config = dataclasses.replace(cfg, tie_word_embeddings=False)
    dev = m.embed_tokens.weight.device
    h = hadamard_matrix(cfg.hidden_size).to(dev)
    h_mlp = hadamard_matrix(cfg.intermediate_size).to(dev)
    m.embed_tokens.weight.data = rotate_embedding(m.embed_tokens.weight, h)
    for layer in m.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm, readers in ((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
                              (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])):
            ws, ones = fuse_rmsnorm_into_linears(norm.weight, [r.weight for r in readers])
            norm.weight.data = ones
            for r, w in zip(readers, ws):
                r.weight.data = rotate_input(w, h)
        for writer in (attn.o_proj, mlp.down_proj):
            w, b = rotate_output(writer.weight, h, writer.bias)
            writer.weight.data = w
            if b is not None:
                writer.bias.data = b
        mlp.down_proj.weight.data = rotate_input(mlp.down_proj.weight, h_mlp)
        mlp.down_proj.online_hadamard = True
    (w,), ones = fuse_rmsnorm_into_linears(m.norm.weight, [model.lm_head.weight])
    m.norm.weight.data = ones
    model.lm_head.weight.data = rotate_input(w, h)


def quantize_loaded(model, tokenizer, recipe: Recipe, calib_file=None, calib_samples: int = 128,
                    calib_len: int = 2048, progress: bool = True) -> None:
    """Calibrate (when the recipe needs it) and quantize a freshly loaded model in place."""
    from lowbit.quant.calibrate import calibration_tokens

    calib = calibration_tokens(tokenizer, calib_file, calib_samples, calib_len) if recipe.calibrated else None
    quantize_model(model, recipe, calib, progress)
