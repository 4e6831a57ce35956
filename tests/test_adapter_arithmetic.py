"""add_weighted_adapter against the real `peft` on the same saved adapters: the same new factors (bit for bit
where the arithmetic is the same, DARE's random masks included) and the same outputs."""

from __future__ import annotations

import math

import pytest
import torch

peft = pytest.importorskip("peft")

from conftest import make_batch, tiny_bert_cls, tiny_gpt2, tiny_llama  # noqa: E402
from test_interop import _quiet, logits  # noqa: E402

from lorafit import LoraConfig, LoraModel, LorafitError, get_lora_model, get_peft_model_state_dict  # noqa: E402
from lorafit.adapter_arithmetic import majority_sign_mask, prune, task_arithmetic, ties  # noqa: E402

ATOL = 1e-5
BUILDERS = {"llama": tiny_llama, "bert": tiny_bert_cls, "gpt2": tiny_gpt2}
# three adapters with non-zero B, overlapping targets (the new adapter covers their union) and two ranks
ADAPTERS = {
    "llama": {"a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
              "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"]),
              "c": dict(r=2, lora_alpha=2, target_modules=["v_proj", "embed_tokens"])},
    "bert": {"a": dict(r=4, lora_alpha=8, target_modules=["query", "value"]),
             "b": dict(r=4, lora_alpha=4, target_modules=["query", "key", "output.dense"]),
             "c": dict(r=2, lora_alpha=6, target_modules=["value"])},
    "gpt2": {"a": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
             "b": dict(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"]),
             "c": dict(r=2, lora_alpha=6, target_modules=["c_proj"])},
}
FACTOR_KINDS = ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
UPDATE_KINDS = ["cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"]
USES_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune_svd"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict]:
    """Per model kind, three adapters saved by lorafit in PEFT's format."""
    root = tmp_path_factory.mktemp("arith")
    dirs: dict[str, dict] = {}
    for kind, specs in ADAPTERS.items():
        dirs[kind] = {}
        for i, (name, spec) in enumerate(specs.items()):
            model = get_lora_model(BUILDERS[kind](0), LoraConfig(init_lora_weights=False, **spec))
            torch.manual_seed(100 + i)
            for param in model.parameters():  # B (and the embedding's A) random, at a LoRA-like scale
                if param.requires_grad:
                    param.data.normal_(0, 0.3)
            model.save_pretrained(root / kind / name)
            dirs[kind][name] = root / kind / name
    return dirs


def both(kind: str, dirs: dict, names: list[str]):
    """The same base with the same adapters loaded, in lorafit and in PEFT."""
    ours = LoraModel.from_pretrained(BUILDERS[kind](0), dirs[names[0]], adapter_name=names[0])
    with _quiet():
        theirs = peft.PeftModel.from_pretrained(BUILDERS[kind](0), dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        ours.load_adapter(dirs[name], name)
        with _quiet():
            theirs.load_adapter(dirs[name], adapter_name=name)
    return ours, theirs


def combine_both(ours, theirs, seed: int = 7, **kwargs) -> None:
    torch.manual_seed(seed)
    with _quiet():
        theirs.add_weighted_adapter(adapter_name="new", **kwargs)
    torch.manual_seed(seed)
    ours.add_weighted_adapter(adapter_name="new", **kwargs)


def new_tensors(model, peft_side: bool) -> dict[str, torch.Tensor]:
    if peft_side:
        with _quiet():  # "Setting save_embedding_layers to True" where embed_tokens is adapted
            return peft.get_peft_model_state_dict(model, adapter_name="new")
    return get_peft_model_state_dict(model, adapter_name="new")


def deltas(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B @ A per layer (the new adapter's scaling is 1): what any factorisation must agree on."""
    out = {}
    for key, A in tensors.items():
        if "lora_A" in key or "lora_embedding_A" in key:
            out[key] = tensors[key.replace("_A", "_B")] @ A
    return out


def max_diff(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[k] - theirs[k]).abs().max().item() for k in ours)


def outputs_diff(kind: str, ours, theirs) -> float:
    batch = make_batch()
    ours.set_adapter("new")
    theirs.set_adapter("new")
    return (logits(ours, batch) - logits(theirs, batch)).abs().max().item()


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("combination", FACTOR_KINDS + UPDATE_KINDS)
def test_same_new_adapter_as_peft(saved, kind, combination):
    names = ["a", "b"] if combination in FACTOR_KINDS else ["a", "b", "c"]
    weights = [0.7, -0.4] if combination in FACTOR_KINDS else [0.7, -0.4, 1.3]
    ours, theirs = both(kind, saved[kind], names)
    combine_both(ours, theirs, adapters=names, weights=weights, combination_type=combination,
                 density=0.5 if combination in USES_DENSITY else None)
    mine, peft_new = new_tensors(ours, False), new_tensors(theirs, True)
    assert max_diff(mine, peft_new) == 0.0  # the same arithmetic in the same order: bit for bit
    assert max_diff(deltas(mine), deltas(peft_new)) == 0.0
    assert ours.peft_config["new"].r == theirs.peft_config["new"].r
    assert ours.peft_config["new"].lora_alpha == theirs.peft_config["new"].lora_alpha
    assert set(ours.peft_config["new"].target_modules) == set(theirs.peft_config["new"].target_modules)
    assert outputs_diff(kind, ours, theirs) <= ATOL
    # and the combination is not a no-op: the new adapter changes the base model's output
    with ours.disable_adapter():
        base = logits(ours, make_batch())
    assert (logits(ours, make_batch()) - base).abs().max() > 1e-3


@pytest.mark.parametrize("options", [
    dict(combination_type="ties", density=0.3, majority_sign_method="frequency"),
    dict(combination_type="dare_ties_svd", density=0.6, majority_sign_method="frequency", svd_rank=3),
    dict(combination_type="svd", svd_rank=5, svd_clamp=0.9),
    dict(combination_type="svd", svd_full_matrices=False),
    dict(combination_type="magnitude_prune", density=1.0),
])
def test_options_as_in_peft(saved, options):
    names = ["a", "b"] if options["combination_type"] in FACTOR_KINDS else ["a", "b", "c"]
    ours, theirs = both("llama", saved["llama"], names)
    combine_both(ours, theirs, adapters=names, weights=[0.9, 0.5, -0.3][:len(names)], **options)
    assert max_diff(new_tensors(ours, False), new_tensors(theirs, True)) == 0.0
    assert outputs_diff("llama", ours, theirs) <= ATOL


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("combination", ["dare_linear", "dare_ties_svd"])
def test_dare_masks_equal_peft_whatever_the_new_adapter_initialisation_draws(tmp_path, init, combination):
    """The new adapter is created (drawing its initial factors) before DARE draws its masks, in both libraries:
    with an embedding targeted, PEFT draws its B twice, and so must lorafit for the masks to match."""
    dirs = {}
    for i, (name, spec) in enumerate(list(ADAPTERS["llama"].items())[:2]):
        model = get_lora_model(tiny_llama(0), LoraConfig(init_lora_weights=init, **spec))
        torch.manual_seed(100 + i)
        for param in model.parameters():
            if param.requires_grad:
                param.data.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    ours, theirs = both("llama", dirs, ["a", "b"])
    combine_both(ours, theirs, adapters=["a", "b"], weights=[0.7, 0.3], combination_type=combination, density=0.5)
    assert max_diff(new_tensors(ours, False), new_tensors(theirs, True)) == 0.0
    assert outputs_diff("llama", ours, theirs) <= ATOL


def test_cat_is_exactly_the_weighted_sum_of_updates(saved):
    """An independent reference: cat's B A equals sum_i w_i s_i B_i A_i computed by hand."""
    ours, _ = both("bert", saved["bert"], ["a", "b"])
    ours.add_weighted_adapter(["a", "b"], [0.5, 2.0], "new", combination_type="cat")
    layer = ours.model.bert.encoder.layer[0].attention.self.query
    expected = sum(w * layer.scaling[n] * layer.lora_B[n].weight @ layer.lora_A[n].weight
                   for n, w in [("a", 0.5), ("b", 2.0)])
    got = layer.lora_B["new"].weight @ layer.lora_A["new"].weight
    assert torch.allclose(got, expected, atol=1e-6) and layer.scaling["new"] == 1.0


def test_svd_at_full_rank_is_the_weighted_sum_and_svd_rank_truncates(saved):
    ours, _ = both("bert", saved["bert"], ["a", "b"])
    ours.add_weighted_adapter(["a", "b"], [0.5, 2.0], "full", combination_type="svd", svd_rank=8)
    ours.add_weighted_adapter(["a", "b"], [0.5, 2.0], "low", combination_type="svd", svd_rank=1)
    layer = ours.model.bert.encoder.layer[0].attention.self.query
    expected = sum(w * layer.delta_weight(n) for n, w in [("a", 0.5), ("b", 2.0)])
    assert torch.allclose(layer.delta_weight("full"), expected, atol=1e-5)
    assert layer.lora_A["low"].weight.shape[0] == 1
    assert torch.linalg.matrix_rank(layer.delta_weight("low")) == 1


def test_linear_weights_factors_by_square_roots_with_the_sign_on_A(saved):
    ours, _ = both("bert", saved["bert"], ["a", "b"])
    ours.add_weighted_adapter(["a", "b"], [0.7, -0.4], "new", combination_type="linear")
    layer = ours.model.bert.encoder.layer[1].attention.self.query
    root_a, root_b = math.sqrt(0.7 * layer.scaling["a"]), math.sqrt(0.4 * layer.scaling["b"])
    A = root_a * layer.lora_A["a"].weight - root_b * layer.lora_A["b"].weight
    B = root_a * layer.lora_B["a"].weight + root_b * layer.lora_B["b"].weight
    assert torch.allclose(layer.lora_A["new"].weight, A, atol=1e-6)
    assert torch.allclose(layer.lora_B["new"].weight, B, atol=1e-6)


def test_dare_draws_follow_the_seed(saved):
    ours, _ = both("llama", saved["llama"], ["a", "b"])
    for name, seed in [("x", 1), ("y", 1), ("z", 2)]:
        torch.manual_seed(seed)
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], name, combination_type="dare_linear", density=0.5)
    x, y, z = (get_peft_model_state_dict(ours, adapter_name=n) for n in "xyz")
    assert all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(x[k], z[k]) for k in x)


def test_one_adapter_is_rescaled_linearly_as_in_peft(saved):
    ours, theirs = both("llama", saved["llama"], ["a"])
    combine_both(ours, theirs, adapters=["a"], weights=[0.5], combination_type="svd")
    assert max_diff(new_tensors(ours, False), new_tensors(theirs, True)) == 0.0
    assert outputs_diff("llama", ours, theirs) <= ATOL


def test_modules_to_save_as_in_peft(tmp_path):
    """One adapter trains the head: the new adapter gets a fresh copy of the base head (PEFT's rule). Two
    adapters that both train it are refused by both libraries."""
    for name, saved_modules in [("head", ["classifier"]), ("plain", None)]:
        model = get_lora_model(tiny_bert_cls(0), LoraConfig(modules_to_save=saved_modules, r=4, init_lora_weights=False,
                                                             target_modules=["query", "value"]))
        torch.manual_seed(3)
        for param in model.parameters():
            if param.requires_grad:
                param.data.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name)
    ours, theirs = both("bert", {"h": tmp_path / "head", "p": tmp_path / "plain"}, ["h", "p"])
    with pytest.warns(UserWarning, match="trained copies of classifier .* not combined"):
        combine_both(ours, theirs, adapters=["h", "p"], weights=[1.0, 1.0], combination_type="cat")
    assert outputs_diff("bert", ours, theirs) <= ATOL
    head = ours.model.classifier
    assert torch.equal(head.modules_to_save["new"].weight, head.original_module.weight)
    assert not torch.equal(head.modules_to_save["h"].weight, head.original_module.weight)
    ours, theirs = both("bert", {"h": tmp_path / "head", "h2": tmp_path / "head"}, ["h", "h2"])
    with pytest.raises(ValueError, match="modules_to_save"):
        theirs.add_weighted_adapter(["h", "h2"], [1.0, 1.0], "new", combination_type="cat")
    with pytest.raises(LorafitError, match="trains classifier in full"):
        ours.add_weighted_adapter(["h", "h2"], [1.0, 1.0], "new", combination_type="cat")


def _saved_bert_adapters(tmp_path, **specs) -> dict:
    dirs = {}
    for i, (name, spec) in enumerate(specs.items()):
        spec = {"target_modules": ["query", "value"], **spec}
        model = get_lora_model(tiny_bert_cls(0), LoraConfig(init_lora_weights=False, **spec))
        torch.manual_seed(200 + i)
        for param in model.parameters():
            if param.requires_grad:
                param.data.normal_(0, 0.3)
        model.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    return dirs


def test_rslora_adapters_combine_to_the_weighted_sum(tmp_path):
    """PEFT keeps use_rslora on the new adapter and so scales it by sqrt(r), not 1; lorafit does not."""
    dirs = _saved_bert_adapters(tmp_path, a=dict(r=4, lora_alpha=8, use_rslora=True),
                                b=dict(r=4, lora_alpha=4, use_rslora=True))
    ours, _ = both("bert", dirs, ["a", "b"])
    ours.add_weighted_adapter(["a", "b"], [1.0, -0.5], "new", combination_type="cat")
    layer = ours.model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling["new"] == 1.0 and not ours.peft_config["new"].use_rslora
    assert torch.allclose(layer.delta_weight("new"), layer.delta_weight("a") - 0.5 * layer.delta_weight("b"),
                          atol=1e-6)


def test_rank_pattern_layers_are_zero_padded_and_load_in_peft(tmp_path):
    """A layer whose rank_pattern rank is below r gets factors padded to r: the same outputs as PEFT's
    combination, and, unlike PEFT's (narrower than its r), a file PEFT loads."""
    dirs = _saved_bert_adapters(tmp_path, a=dict(r=4, rank_pattern={"value": 2}),
                                b=dict(r=4, rank_pattern={"value": 2}))
    ours, theirs = both("bert", dirs, ["a", "b"])
    combine_both(ours, theirs, adapters=["a", "b"], weights=[0.5, 0.5], combination_type="linear")
    assert outputs_diff("bert", ours, theirs) <= ATOL
    ours.save_pretrained(tmp_path / "saved", selected_adapters=["new"])
    with _quiet():
        loaded = peft.PeftModel.from_pretrained(tiny_bert_cls(0), tmp_path / "saved" / "new")
    assert (logits(ours, make_batch()) - logits(loaded, make_batch())).abs().max() <= ATOL


def test_layers_the_first_adapter_leaves_out_are_left_out_with_a_warning_as_in_peft(tmp_path):
    dirs = _saved_bert_adapters(tmp_path, a=dict(r=4, layers_to_transform=[0]), b=dict(r=4))
    ours, theirs = both("bert", dirs, ["a", "b"])
    with pytest.warns(UserWarning, match=r"layer\.1\.attention\.self\.query.* left out"):
        combine_both(ours, theirs, adapters=["a", "b"], weights=[1.0, 1.0], combination_type="cat")
    assert "new" not in ours.model.bert.encoder.layer[1].attention.self.query.r
    assert outputs_diff("bert", ours, theirs) <= ATOL


def test_a_layer_no_adapter_adapts_is_refused_and_changes_nothing(tmp_path):
    dirs = _saved_bert_adapters(tmp_path, a=dict(r=4, target_modules=["query"]),
                                b=dict(r=4, target_modules=["key"], layers_to_transform=[1]))
    ours, theirs = both("bert", dirs, ["a", "b"])
    with pytest.raises(ValueError, match="No matching LoRAs"), _quiet():
        theirs.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    with pytest.raises(LorafitError, match=r"'bert\.encoder\.layer\.0\.attention\.self\.key' is adapted by the new"):
        ours.add_weighted_adapter(["a", "b"], [1.0, 1.0], "new", combination_type="cat")
    assert list(ours.peft_config) == ["a", "b"]
    assert not [m for m in ours.modules() if "new" in getattr(m, "r", {})]


@pytest.mark.parametrize("order", [["dora", "plain"], ["plain", "dora"]])
@pytest.mark.parametrize("combination", ["svd", "linear", "cat"])
def test_a_dora_adapter_is_refused_in_any_place_and_changes_nothing(tmp_path, order, combination):
    """add_weighted_adapter combines B A updates; a DoRA adapter's trained magnitudes are not one (PEFT drops
    them, and gives the new adapter fresh ones when the first adapter is DoRA)."""
    dirs = _saved_bert_adapters(tmp_path, dora=dict(r=4, use_dora=True), plain=dict(r=4))
    ours = LoraModel.from_pretrained(tiny_bert_cls(0), dirs[order[0]], adapter_name=order[0])
    ours.load_adapter(dirs[order[1]], order[1])
    with pytest.raises(LorafitError, match="adapter 'dora' is a DoRA adapter"):
        ours.add_weighted_adapter(order, [1.0, 1.0], "new", combination_type=combination)
    assert list(ours.peft_config) == order
    assert not [m for m in ours.modules() if "new" in getattr(m, "r", {})]


def test_saved_combination_loads_in_peft_with_the_same_outputs(saved, tmp_path):
    ours, _ = both("llama", saved["llama"], ["a", "b", "c"])
    ours.add_weighted_adapter(["a", "b", "c"], [0.6, 0.4, 0.2], "new", combination_type="ties_svd", density=0.7)
    ours.save_pretrained(tmp_path, selected_adapters=["new"])
    with _quiet():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(0), tmp_path / "new")
    ours.set_adapter("new")
    assert (logits(ours, make_batch()) - logits(theirs, make_batch())).abs().max() <= ATOL


@pytest.mark.parametrize("kwargs, fragments", [
    (dict(adapters=["a", "b"], weights=[1.0], combination_type="linear"), ["1 weight(s) for 2 adapter(s)"]),
    (dict(adapters=["a", "b"], weights=[1.0, 1.0], combination_type="average"), ["unknown combination_type", "ties"]),
    (dict(adapters=["a", "b"], weights=[1.0, 1.0], combination_type="ties"), ["needs density", "(0, 1]"]),
    (dict(adapters=["a", "b"], weights=[1.0, 1.0], combination_type="dare_ties", density=1.5), ["(0, 1]", "1.5"]),
    (dict(adapters=["a", "b"], weights=[1.0, 1.0], combination_type="dare_linear", density=0.0), ["(0, 1]"]),
    (dict(adapters=["a", "b"], weights=[1.0, 1.0], combination_type="linear", density=0.5), ["leave density out"]),
    (dict(adapters=["a", "c"], weights=[1.0, 1.0], combination_type="linear"), ["same r", "a: 4, c: 2", "'cat'"]),
    (dict(adapters=["a", "x"], weights=[1.0, 1.0], combination_type="cat"), ["no adapter named 'x'"]),
    (dict(adapters=["a", "b"], weights=[1.0, float("nan")], combination_type="cat"), ["finite"]),
    (dict(adapters=["a", "b"], weights=[1.0, 1.0], combination_type="ties", density=0.5,
          majority_sign_method="mean"), ["'total' or 'frequency'"]),
    (dict(adapters=["a", "b"], weights=[1.0, 1.0], combination_type="svd", svd_rank=0), ["svd_rank"]),
    (dict(adapters=["a", "b"], weights=[1.0, 1.0], combination_type="svd", svd_clamp=5), ["svd_clamp", "[0, 1]"]),
    (dict(adapters=["a"], weights=[1.0], combination_type="cat", adapter_name="b"), ["'b' already exists"]),
])
def test_bad_arguments_are_one_line_and_change_nothing(saved, kwargs, fragments):
    ours, _ = both("bert", saved["bert"], ["a", "b", "c"])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    modules = [type(m) for m in ours.modules()]
    with pytest.raises(LorafitError) as err:
        ours.add_weighted_adapter(**{"adapter_name": "new", **kwargs})
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert list(ours.peft_config) == ["a", "b", "c"] and ours.active_adapter == "a"
    assert [type(m) for m in ours.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_regex_and_list_targets_cannot_be_joined(tmp_path):
    for name, targets in [("listed", ["query"]), ("regex", r".*\.value")]:
        get_lora_model(tiny_bert_cls(0), LoraConfig(r=4, target_modules=targets)).save_pretrained(tmp_path / name)
    ours, _ = both("bert", {"l": tmp_path / "listed", "r": tmp_path / "regex"}, ["l", "r"])
    with pytest.raises(LorafitError, match="all lists or all regexes"):
        ours.add_weighted_adapter(["l", "r"], [1.0, 1.0], "new", combination_type="cat")
    assert list(ours.peft_config) == ["l", "r"]


def test_regex_targets_are_alternated(tmp_path):
    for name, targets in [("q", r".*\.query"), ("v", r".*\.value")]:
        get_lora_model(tiny_bert_cls(0), LoraConfig(r=4, target_modules=targets)).save_pretrained(tmp_path / name)
    ours, theirs = both("bert", {"q": tmp_path / "q", "v": tmp_path / "v"}, ["q", "v"])
    combine_both(ours, theirs, adapters=["q", "v"], weights=[1.0, 1.0], combination_type="svd")
    assert ours.peft_config["new"].target_modules == theirs.peft_config["new"].target_modules
    assert max_diff(new_tensors(ours, False), new_tensors(theirs, True)) == 0.0


# --- the tensor functions on hand-made inputs ------------------------------------------------------

def test_magnitude_prune_keeps_the_largest_entries():
    t = torch.tensor([[0.1, -3.0], [2.0, -0.5]])
    assert torch.equal(prune(t, 0.5, "magnitude"), torch.tensor([[0.0, -3.0], [2.0, 0.0]]))
    assert prune(t, 1.0, "magnitude") is t


def test_random_prune_rescales_what_it_keeps():
    torch.manual_seed(0)
    t = torch.ones(1000)
    kept = prune(t, 0.25, "random")
    assert set(kept.unique().tolist()) == {0.0, 4.0}
    assert 0.2 < (kept > 0).float().mean() < 0.3


def test_ties_averages_the_entries_that_agree_with_the_elected_sign():
    a, b, c = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([3.0, 1.0, 0.0]), torch.tensor([-1.0, -1.0, 0.0])
    # entry 0: sum +3, + wins, mean of 1 and 3; entry 1: sum -2, - wins, mean of -2 and -1; entry 2: none agree
    assert torch.equal(ties([a, b, c], torch.ones(3)), torch.tensor([2.0, -1.5, 0.0]))
    # "frequency" elects by count: entry 0 two + against one -
    assert majority_sign_mask(torch.stack([a, b, c]), "frequency")[:, 0].tolist() == [True, True, False]
    assert torch.equal(task_arithmetic([a, b], torch.tensor([2.0, -1.0])), torch.tensor([-1.0, -5.0, 0.0]))
