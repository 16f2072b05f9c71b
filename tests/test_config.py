from pathlib import Path

import pytest

from thinkrl.config import Config, ConfigError, build_config, load_yaml, parse_overrides, save_config


def test_parse_overrides_types_and_nesting():
    got = parse_overrides(
        [
            "max_steps=5",
            "optim.lr=0.001",
            "progress=false",
            "task.name=chain_sum",
            "algo.clip_eps_high=0.28",
            "optim.betas=[0.9, 0.95]",
            "task.system_prompt=",
            "a.b.c=x=y",
        ]
    )
    assert got == {
        "max_steps": 5,
        "optim": {"lr": 0.001, "betas": [0.9, 0.95]},
        "progress": False,
        "task": {"name": "chain_sum", "system_prompt": ""},
        "algo": {"clip_eps_high": 0.28},
        "a": {"b": {"c": "x=y"}},
    }  # only the first '=' splits


@pytest.mark.parametrize("item", ["max_steps", "=3"])
def test_parse_overrides_rejects_malformed_items(item):
    with pytest.raises(ConfigError, match="override"):
        parse_overrides([item])


def test_build_config_coerces_types():
    cfg = build_config(
        overrides=[
            "max_steps=5",
            "optim.lr=0.001",
            "progress=false",
            "algo.kl_coef=1",
            "optim.betas=[0.9, 0.95]",
            "task.params.min_terms=2",
            "model=123",
            "algo.clip_eps_high=0.28",
            "eval.max_new_tokens=null",
        ]
    )
    assert cfg.max_steps == 5 and type(cfg.max_steps) is int
    assert cfg.optim.lr == 0.001
    assert cfg.progress is False
    assert cfg.algo.kl_coef == 1.0 and type(cfg.algo.kl_coef) is float  # an int where a float is expected
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.task.params == {"min_terms": 2}
    assert cfg.model == "123"
    assert cfg.algo.clip_eps_high == 0.28 and cfg.eval.max_new_tokens is None
    # untouched defaults stay
    assert cfg.rollout.group_size == Config().rollout.group_size


@pytest.mark.parametrize(
    "item,section,key,value",
    [
        ("optim.lr=1e-5", "optim", "lr", 1e-5),
        ("algo.kl_coef=5e-3", "algo", "kl_coef", 5e-3),
    ],
)
def test_scientific_notation_floats(item, section, key, value):
    cfg = build_config(overrides=[item])
    assert getattr(getattr(cfg, section), key) == value


def test_overriding_one_reward_weight_keeps_the_others():
    cfg = build_config(overrides=["rewards.format=0.5"])
    assert cfg.rewards == {"accuracy": 1.0, "format": 0.5}


def test_unknown_top_level_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown config key 'mdoel'") as e:
        build_config(overrides=["mdoel=x"])
    for key in ("model", "output_dir", "max_steps", "algo", "rollout"):
        assert key in str(e.value)


def test_unknown_nested_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown config key 'algo.klcoef'") as e:
        build_config(overrides=["algo.klcoef=0.1"])
    assert "algo.kl_coef" in str(e.value) and "algo.advantage" in str(e.value)


@pytest.mark.parametrize(
    "item,match",
    [
        ("max_steps=abc", "max_steps: expected an integer"),
        ("max_steps=2.5", "max_steps: expected an integer"),
        ("max_steps=true", "max_steps: expected an integer"),
        ("progress=maybe", "progress: expected true/false"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("algo.clip_eps_high=high", "algo.clip_eps_high: expected a number"),
        ("task.params=3", "task.params: expected a mapping"),
        ("algo=3", "algo: expected a mapping"),
        ("model=[a, b]", "model: expected a string"),
    ],
)
def test_wrong_types_raise(item, match):
    with pytest.raises(ConfigError, match=match):
        build_config(overrides=[item])


@pytest.mark.parametrize(
    "item,match",
    [
        (
            "algo.advantage=nope",
            "unknown advantage estimator 'nope'; choose from: dr_grpo, gae, grpo, reinforce, reinforce_pp, reinforce_pp_baseline, rloo",
        ),
        ("algo.loss=nope", "unknown policy loss 'nope'; choose from: dual_clip, gspo, kimi, pg, ppo_clip"),
        ("algo.kl_estimator=k4", "unknown KL estimator 'k4'; choose from: k1, k2, k3"),
        ("algo.loss_agg=nope", "unknown loss aggregation 'nope'; choose from: seq_mean_token_mean"),
        (
            "rewards.nope=1",
            "unknown reward 'nope'; choose from: accuracy, choice, code, exact, format, hedging, "
            "judge, kimi_length, language, math, overlong, repetition, rm",
        ),
    ],
)
def test_unknown_registry_names_list_choices(item, match):
    with pytest.raises(ConfigError, match=match):
        build_config(overrides=[item])


@pytest.mark.parametrize(
    "item,match",
    [
        ("rollout.group_size=1", "group_size must be >= 2"),
        ("max_steps=0", "max_steps must be >= 1"),
        ("rollout.temperature=0", "temperature must be > 0"),
        ("optim.schedule=step", "choose from: constant, cosine, linear"),
        ("dtype=fp16", "choose from: auto, bf16, fp32"),
        ("task.template=alpaca", "choose from: chat, plain, r1_zero"),
        ("rewards.accuracy=high", "rewards.accuracy: weight must be a number"),
    ],
)
def test_validation(item, match):
    with pytest.raises(ConfigError, match=match):
        build_config(overrides=[item])


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: tiny-random\nmax_steps: 7\nalgo:\n  advantage: rloo\n  clip_eps: 0.3\n"
        "rollout:\n  group_size: 4\nrewards:\n  accuracy: 2.0\n"
    )
    cfg = build_config(path, ["max_steps=9", "rollout.max_new_tokens=16"])
    assert cfg.model == "tiny-random"
    assert cfg.max_steps == 9  # the override wins over the file
    assert cfg.algo.advantage == "rloo" and cfg.algo.clip_eps == 0.3
    assert cfg.algo.kl_estimator == "k3"  # a sibling the file did not set keeps its default
    assert cfg.rollout.group_size == 4 and cfg.rollout.max_new_tokens == 16
    assert cfg.rewards == {"accuracy": 2.0, "format": 0.1}  # rewards merge key by key with the defaults


def test_yaml_unknown_key_in_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo:\n  advantge: rloo\n")
    with pytest.raises(ConfigError, match="unknown config key 'algo.advantge'"):
        build_config(path)


@pytest.mark.parametrize(
    "text,match",
    [
        ("a: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "top level must be a mapping"),
    ],
)
def test_bad_yaml_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_yaml(path)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found") as e:
        build_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(e.value)


def test_empty_yaml_file_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert build_config(path).to_dict() == Config().to_dict()


def test_save_config_round_trips(tmp_path):
    cfg = build_config(
        overrides=[
            "model=tiny-random",
            "optim.betas=[0.8, 0.9]",
            "algo.clip_eps_high=0.28",
            "task.params.min_terms=2",
            "rewards.accuracy=1.5",
        ]
    )
    save_config(cfg, tmp_path / "config.yaml")
    again = build_config(tmp_path / "config.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_recipe_loads(path):
    cfg = build_config(path)
    assert cfg.max_steps >= 1 and cfg.output_dir
