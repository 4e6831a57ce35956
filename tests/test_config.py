"""LoraConfig: PEFT's field names and defaults, validation, per-module rank/alpha, PEFT dict round trip."""

from __future__ import annotations

import dataclasses
import json
import math

import peft
import pytest

from lorafit import LoraConfig


QUERY = "bert.encoder.layer.0.attention.self.query"
VALUE = "bert.encoder.layer.1.attention.self.value"


def _defaults(cls) -> dict:
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)}


def test_field_names_and_defaults_are_pefts():
    ours, theirs = _defaults(LoraConfig), _defaults(peft.LoraConfig)
    missing = sorted(set(ours) - set(theirs))
    assert missing == [], f"fields PEFT does not have: {missing}"
    assert {name: ours[name] for name in ours} == {name: theirs[name] for name in ours}
    # spot checks that do not depend on PEFT's version
    config = LoraConfig()
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (8, 8, 0.0, "none")
    assert config.init_lora_weights is True and config.use_rslora is False and config.target_modules is None


@pytest.mark.parametrize(
    ("field", "value", "allowed_words"),
    [
        ("r", 0, ["positive", "integer"]),
        ("r", -3, ["positive", "integer"]),
        ("r", 4.0, ["positive", "integer"]),
        ("r", 2.5, ["positive", "integer"]),
        ("r", "8", ["positive", "integer"]),
        ("r", True, ["positive", "integer"]),
        ("lora_alpha", 0, ["> 0"]),
        ("lora_alpha", -1.5, ["> 0"]),
        ("lora_alpha", "16", ["> 0"]),
        ("lora_dropout", 1.0, ["[0, 1)"]),
        ("lora_dropout", 1, ["[0, 1)"]),
        ("lora_dropout", -0.1, ["[0, 1)"]),
        ("lora_dropout", 7, ["[0, 1)"]),
        ("task_type", "CLASSIFY", ["SEQ_CLS", "CAUSAL_LM", "TOKEN_CLS", "FEATURE_EXTRACTION"]),
        ("task_type", "seq_cls", ["SEQ_CLS", "CAUSAL_LM"]),
        ("bias", "some", ["none", "all", "lora_only"]),
        ("bias", None, ["none", "all", "lora_only"]),
        ("init_lora_weights", "loftq", ["True", "False", "gaussian", "pissa", "olora", "pissa_niter_<K>"]),
        ("init_lora_weights", "kaiming", ["True", "False", "gaussian"]),
        ("init_lora_weights", 1, ["True", "False", "gaussian"]),
        ("init_lora_weights", None, ["True", "False", "gaussian"]),
    ],
)
def test_invalid_values_raise_naming_field_and_allowed_values(field, value, allowed_words):
    with pytest.raises(ValueError) as excinfo:
        LoraConfig(**{field: value})
    message = str(excinfo.value)
    assert field in message
    for word in allowed_words:
        assert word in message, f"{word!r} missing from {message!r}"


@pytest.mark.parametrize(("field", "value"), [("rank_pattern", {"query": 0}), ("rank_pattern", {"query": 2.0}),
                                              ("alpha_pattern", {"query": 0}), ("alpha_pattern", {"query": -4})])
def test_invalid_pattern_values_raise(field, value):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**{field: value})


@pytest.mark.parametrize("value", [0.0, 0.5, 0.999, 0])
def test_dropout_bounds_accept_half_open_interval(value):
    assert LoraConfig(lora_dropout=value).lora_dropout == value


@pytest.mark.parametrize("task", ["SEQ_CLS", "CAUSAL_LM", "TOKEN_CLS", "FEATURE_EXTRACTION", None])
def test_valid_task_types(task):
    assert LoraConfig(task_type=task).task_type == task


def test_task_type_enum_from_peft_is_accepted():
    assert LoraConfig(task_type=peft.TaskType.SEQ_CLS).task_type == "SEQ_CLS"


def test_valid_init_modes():
    assert LoraConfig(init_lora_weights=False).init_lora_weights is False
    assert LoraConfig(init_lora_weights="gaussian").init_lora_weights == "gaussian"


def test_rank_and_alpha_patterns_match_the_end_of_the_name_at_a_dot():
    config = LoraConfig(r=8, lora_alpha=16, rank_pattern={"query": 2, r"layer\.1\..*value": 4},
                        alpha_pattern={"value": 3})
    assert config.rank_for(QUERY) == 2
    assert config.rank_for(VALUE) == 4
    assert config.rank_for("bert.encoder.layer.0.attention.self.value") == 8  # layer 0 value: no pattern
    assert config.rank_for("bert.my_query") == 8  # "query" must be a whole last component
    assert config.rank_for("bert.query_proj") == 8
    assert config.rank_for("query") == 2  # a bare top-level name
    assert config.alpha_for(VALUE) == 3
    assert config.alpha_for(QUERY) == 16
    assert config.scaling_for(QUERY) == pytest.approx(16 / 2)
    assert config.scaling_for(VALUE) == pytest.approx(3 / 4)
    assert config.scaling_for("bert.encoder.layer.0.attention.self.key") == pytest.approx(16 / 8)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    config = LoraConfig(r=16, lora_alpha=8, use_rslora=True, rank_pattern={"query": 4})
    assert config.scaling_for("x.key") == pytest.approx(8 / math.sqrt(16))
    assert config.scaling_for(QUERY) == pytest.approx(8 / math.sqrt(4))
    assert LoraConfig(r=16, lora_alpha=8).scaling_for("x.key") == pytest.approx(8 / 16)


def test_patterns_agree_with_peft_on_a_real_model():
    """Same rank_pattern/alpha_pattern, per-layer r and scaling equal to what PEFT builds."""
    from conftest import tiny_bert_cls

    kwargs = dict(r=8, lora_alpha=16, target_modules=["query", "value", "key"], use_rslora=True,
                  rank_pattern={"query": 2, r"layer\.1\.attention\.self\.value": 4}, alpha_pattern={"key": 5})
    ours = LoraConfig(**kwargs)
    peft_model = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(**kwargs))
    checked = 0
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            assert ours.rank_for(name) == module.r["default"], name
            assert ours.scaling_for(name) == pytest.approx(module.scaling["default"]), name
            checked += 1
    assert checked == 6


def test_peft_dict_round_trip():
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=12.5, lora_dropout=0.1,
                        target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"], bias="lora_only",
                        modules_to_save=["score"], init_lora_weights="gaussian", use_rslora=True,
                        rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}, layers_to_transform=[0],
                        layers_pattern="layers", base_model_name_or_path="some/model")
    data = config.to_peft_dict()
    assert data["peft_type"] == "LORA" and data["use_dora"] is False
    data = json.loads(json.dumps(data))  # what goes through adapter_config.json
    again = LoraConfig.from_peft_dict(data)
    assert again == config
    assert again.to_peft_dict() == config.to_peft_dict()


def test_regex_targets_round_trip():
    config = LoraConfig(target_modules=r".*\.(query|value)")
    assert LoraConfig.from_peft_dict(json.loads(json.dumps(config.to_peft_dict()))) == config


def test_peft_written_config_is_read():
    peft_config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=32, target_modules=["query", "value"],
                                  rank_pattern={"query": 2})
    ours = LoraConfig.from_peft_dict(json.loads(json.dumps(peft_config.to_dict(), default=sorted)))
    assert (ours.task_type, ours.r, ours.lora_alpha) == ("SEQ_CLS", 4, 32)
    assert sorted(ours.target_modules) == ["query", "value"]
    assert ours.rank_pattern == {"query": 2}


def test_to_peft_dict_is_read_by_peft():
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=32, target_modules=["query"], lora_dropout=0.1)
    data = json.loads(json.dumps(config.to_peft_dict()))
    theirs = peft.LoraConfig.from_peft_type(**data)
    assert (theirs.r, theirs.lora_alpha, theirs.lora_dropout, theirs.task_type) == (4, 32, 0.1, "SEQ_CLS")


@pytest.mark.parametrize(("key", "value"), [("lora_bias", True), ("use_qalora", True),
                                            ("layer_replication", [[0, 1]])])
def test_from_peft_dict_refuses_lora_variants(key, value):
    data = LoraConfig().to_peft_dict()
    data[key] = value
    with pytest.raises(ValueError, match=key):
        LoraConfig.from_peft_dict(data)


def test_from_peft_dict_refuses_other_methods_and_unknown_fields():
    with pytest.raises(ValueError, match="IA3"):
        LoraConfig.from_peft_dict({"peft_type": "IA3", "target_modules": ["k"]})
    data = LoraConfig().to_peft_dict()
    data["made_up_field"] = 1
    with pytest.raises(ValueError, match="made_up_field"):
        LoraConfig.from_peft_dict(data)


def test_from_peft_dict_validates_values():
    data = LoraConfig().to_peft_dict()
    data["r"] = 0
    with pytest.raises(ValueError, match="r"):
        LoraConfig.from_peft_dict(data)


def test_sets_and_scalars_are_normalised():
    config = LoraConfig(target_modules={"value", "query"}, layers_to_transform=1, layers_pattern="layer")
    assert config.target_modules == ["query", "value"]
    assert config.layers_to_transform == [1]
    assert config.layers_pattern == "layer"  # PEFT keeps (and writes) it as given


def test_exposes_what_peft_helpers_read():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    assert ours.peft_type == theirs.peft_type == "LORA"
    assert ours.is_prompt_learning is theirs.is_prompt_learning is False
