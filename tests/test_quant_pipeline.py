"""Recipes applied to a whole model: calibrate -> transform -> quantize -> save -> load -> eval."""
import errno
import json

import pytest
import torch

from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import dataset_tokens, perplexity
from lowbit.models.loader import load_model
from lowbit.quant.calibrate import calibration_tokens
from lowbit.quant.checkpoint import save_checkpoint
from lowbit.quant.quantize import quantize_model, rotate_model
from lowbit.quant.recipes import RECIPES, KVSpec, Recipe, get_recipe


@pytest.fixture(scope="module")
def setup(tiny_dir):
    path = tiny_dir("llama3")
    _, tok, _ = load_model(path)
    return path, calibration_tokens(tok, samples=4, seq_len=64), dataset_tokens(tok)


def ppl(model, tokens):
    return perplexity(model, tokens, ctx=64, max_windows=3, progress=False)["ppl"]


@pytest.mark.parametrize("name", [n for n in RECIPES if n != "bf16"] + ["rtn-w4a4kv4"])
def test_quantize_save_load_gives_the_same_perplexity(name, setup, tmp_path):
    path, calib, tokens = setup
    model, tok, _ = load_model(path)
    fp = ppl(model, tokens)
    recipe = get_recipe(name)
    quantize_model(model, recipe, calib, progress=False)
    in_memory = ppl(model, tokens)
    assert in_memory != fp  # quantization did something
    save_checkpoint(model, tok, recipe, tmp_path / "q")
    loaded, _, _ = load_model(tmp_path / "q")
    assert ppl(loaded, tokens) == pytest.approx(in_memory, rel=1e-6)


def test_rotation_preserves_the_function(setup):
    path, _, _ = setup
    model, _, cfg = load_model(path)
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    want = model.logits_for_batch(ids)
    rotate_model(model)
    model.model.layers[0].mlp.down_proj.weight  # rotated in place
    got = model.logits_for_batch(ids)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    assert not torch.allclose(model.model.embed_tokens.weight, load_model(path)[0].model.embed_tokens.weight)


def test_recipes_round_trip_through_json(tmp_path):
    for recipe in RECIPES.values():
        f = tmp_path / f"{recipe.name}.json"
        f.write_text(json.dumps(recipe.to_dict()))
        assert get_recipe(str(f)) == recipe


def test_unknown_recipe():
    with pytest.raises(LowbitError, match="unknown recipe 'w3a3'"):
        get_recipe("w3a3")


def test_group_size_must_be_a_power_of_two(tmp_path):
    d = RECIPES["w4a16"].to_dict()
    d["weight"]["group_size"] = 100
    f = tmp_path / "r.json"
    f.write_text(json.dumps(d))
    with pytest.raises(LowbitError, match="power of two"):
        get_recipe(str(f))


def test_calibration_file_missing_or_too_short(tmp_path, default_tokenizer):
    with pytest.raises(LowbitError, match="cannot read calibration text"):
        calibration_tokens(default_tokenizer, tmp_path / "none.txt")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(LowbitError, match="shorter than one calibration sample"):
        calibration_tokens(default_tokenizer, short, samples=2, seq_len=64)


def run_cli(capsys, *argv):
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr()


def test_cli_refuses_an_existing_output_unless_forced(setup, tmp_path, capsys):
    path, _, _ = setup
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, io = run_cli(capsys, "quantize", "--model", str(path), "--device", "cpu", "--recipe", "rtn-w4a16",
                       "--output", str(out))
    assert code == 2 and "exists" in io.err and (out / "keep.txt").read_text() == "mine"
    code, io = run_cli(capsys, "quantize", "--model", str(path), "--device", "cpu", "--recipe", "rtn-w4a16",
                       "--output", str(out), "--force")
    assert code == 0 and (out / "quant_config.json").is_file() and not (out / "keep.txt").exists()
    code, io = run_cli(capsys, "eval", "--model", str(out), "--device", "cpu", "--ctx", "64", "--max-windows", "2",
                       "--json")
    assert code == 0 and json.loads(io.out)["perplexity"]["windows"] == 2


def test_cli_bad_inputs(setup, tmp_path, capsys):
    path, _, _ = setup
    for argv, msg in [(["--recipe", "nope"], "unknown recipe"), (["--recipe", "w4a16", "--calib", str(tmp_path / "x")],
                                                                   "cannot read calibration text")]:
        code, io = run_cli(capsys, "quantize", "--model", str(path), "--device", "cpu", *argv,
                           "--output", str(tmp_path / "o"))
        assert code == 2 and msg in io.err and not (tmp_path / "o").exists()
    code, io = run_cli(capsys, "eval", "--model", str(path), "--device", "cpu", "--max-windows", "0")
    assert code == 2 and "max-windows" in io.err


def test_disk_full_during_save_leaves_nothing(setup, tmp_path, monkeypatch):
    path, calib, _ = setup
    model, tok, _ = load_model(path)
    quantize_model(model, RECIPES["fp8"], None, progress=False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(LowbitError, match="No space left"):
        save_checkpoint(model, tok, RECIPES["fp8"], tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_bits_never_help_fewer(setup):
    """More bits never lose to fewer (same algorithm family, plain RTN)."""
    path, calib, tokens = setup
    results = {}
    for name in ["rtn-w8a8", "rtn-w4a16", "rtn-w4a4kv4"]:
        model, _, _ = load_model(path)
        quantize_model(model, get_recipe(name), calib, progress=False)
        results[name] = ppl(model, tokens)
    assert results["rtn-w8a8"] <= results["rtn-w4a16"] <= results["rtn-w4a4kv4"]


def test_progressive_weights_take_the_clip_search_not_gptq():
    spec = RECIPES["w4a8kv4"].weight
    Recipe("p", weight=spec, progressive=True, clip_search=True, kv=KVSpec(4))
    with pytest.raises(LowbitError, match="method rtn"):
        Recipe("p", weight=spec, progressive=True, method="gptq")


@pytest.mark.parametrize("name,change", [("w8a8", {}), ("w4a8kv4", {}), ("w4a4kv4", {}),
                                         ("w4a4kv4", {"smoothing": "smoothquant"})],
                         ids=["smoothquant-gptq", "awq-clip", "atom-reorder", "smoothquant-then-reorder"])
def test_one_calibration_pass_gives_the_statistics_of_the_inputs_the_weights_see(name, change, setup):
    """After smoothing and the outlier reorder, the statistics derived from the one pass equal those
    of the inputs recorded afresh, each as its weight now sees it: gathered by its permutation at
    run time, or (down_proj) already permuted by gate/up's rows."""
    import dataclasses

    from lowbit.quant.calibrate import InputStats
    from lowbit.quant.quantize import GROUPS, calibrate_layer, layer_linears, run_layer

    path, calib, _ = setup
    model, _, _ = load_model(path)
    recipe = dataclasses.replace(get_recipe(name), **change)
    layer = model.model.layers[0]
    x = model.model.embed_tokens(calib)
    rec, perms = calibrate_layer(layer, x, recipe, batch_size=2)
    fresh, hooks = {}, []
    for n, lin in layer_linears(layer).items():
        fresh[n] = InputStats(lin.in_features, "cpu", hessian=True, keep_tokens=rec.stats[n].keep_tokens)
        perm = None if n in GROUPS["down"] else perms.get(n)
        hooks.append(lin.register_forward_pre_hook(
            lambda m, a, n=n, perm=perm: fresh[n].add(a[0] if perm is None else a[0][..., perm])))
    run_layer(layer, x, batch_size=2)
    for h in hooks:
        h.remove()
    if recipe.outliers:
        assert perms and all(not torch.equal(p, torch.arange(p.numel())) for p in perms.values())
    for n, st in rec.stats.items():
        want = fresh[n]
        torch.testing.assert_close(st.absmax, want.absmax, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st.mean_square, want.mean_square, rtol=1e-4, atol=1e-6)
        if st.hessian is not None:
            torch.testing.assert_close(st.hessian.hessian, want.hessian.hessian, rtol=1e-3, atol=1e-5)
        if st.kept:
            torch.testing.assert_close(st.samples, want.samples, rtol=1e-4, atol=1e-5)
