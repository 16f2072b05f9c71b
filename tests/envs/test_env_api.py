"""The environment API contract, the python tool environment and its per-call sandbox limits."""

import pytest

from thinkrl.config import ConfigError, EnvConfig, build_config
from thinkrl.envs import ENVS, SETTINGS, build_env, validate_env
from thinkrl.envs.python import format_output, tool_call
from thinkrl.tasks import Example


def example():
    return Example(question="What is 6 * 7?", answer="42")


@pytest.mark.parametrize("name", ["single_turn", "python"])
def test_contract(name):
    env = build_env(EnvConfig(name=name))
    msgs = env.reset(example())
    assert all(set(m) == {"role", "content"} for m in msgs)
    assert msgs[-1] == {"role": "user", "content": "What is 6 * 7?"}
    assert env.reset(example()) == msgs and env.reset(example()) is not msgs  # fresh lists, same content
    # a turn with no tool call ends the episode; the task's rewards judge it (reward None)
    obs, reward, done, info = env.step(msgs, "<think> 6 times 7 </think> <answer> 42 </answer>")
    assert (obs, reward, done, info["reason"]) == (None, None, True, "answered")
    assert isinstance(env.stop, tuple) and isinstance(env.multi_turn, bool)
    assert set(SETTINGS[name]) <= {f for f in EnvConfig.__dataclass_fields__}


def test_registry_lists_both():
    assert {"single_turn", "python"} <= set(ENVS.names())


def test_bad_env_settings_are_one_config_error():
    with pytest.raises(ConfigError, match="unknown environment 'pyton'; choose from: python, single_turn"):
        build_config(overrides=["env.name=pyton"])
    for key, msg in [
        ("max_tool_calls=-1", "max_tool_calls"),
        ("call_timeout_s=0", "call_timeout_s"),
        ("call_memory_mb=1", "call_memory_mb"),
        ("max_output_chars=0", "max_output_chars"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            build_config(overrides=["env.name=python", f"env.{key}"])
    with pytest.raises(ConfigError, match="critic"):
        build_config(overrides=["env.name=python", "algo.advantage=gae"])
    validate_env(EnvConfig())  # the default is valid


def test_tool_call_parsing():
    assert tool_call("let me compute <python>\nprint(6*7)\n</python>") == "print(6*7)\n"
    assert tool_call("<python>\n```python\nx = 2\nprint(x)\n```\n</python>\n") == "x = 2\nprint(x)\n"
    assert tool_call("<answer> 42 </answer>") is None
    assert tool_call("no opening </python>") is None
    assert tool_call("<python>print(1)</python> and more text") is None  # not a turn ended by a call


def test_output_is_cut_and_killed_calls_are_said():
    cfg = EnvConfig(name="python", max_output_chars=5, call_timeout_s=2, call_memory_mb=64)
    assert (
        format_output("ok", "1234567890\n", "", cfg)
        == "\n<output>\n12345\n[... 5 more characters cut]\n</output>\n"
    )
    cfg = EnvConfig(name="python", call_timeout_s=2, call_memory_mb=64)
    assert format_output("timeout", "", "", cfg) == "\n<output>\n[killed: it ran past 2 s]\n</output>\n"
    runner = 'Traceback:\n  File "runner.py", line 9\n  File "solution.py", line 1\nZeroDivisionError: x\n'
    assert (
        format_output("error", "a\n", runner, cfg)
        == '\n<output>\na\nFile "solution.py", line 1\nZeroDivisionError: x\n</output>\n'
    )


def python_env(**kw):
    return build_env(EnvConfig(name="python", **kw))


def test_a_call_runs_in_the_sandbox_and_its_output_comes_back():
    env = python_env()
    msgs = env.reset(example())
    obs, reward, done, info = env.step(msgs, "<think> <python>\nprint(6 * 7)\n</python>")
    assert (obs, reward, done) == ("\n<output>\n42\n</output>\n", None, False)
    assert info["tool_status"] == "ok"


def test_per_call_limits_kill_the_call_and_the_episode_goes_on():
    env = python_env(call_timeout_s=1.0, call_memory_mb=128)
    msgs = env.reset(example())
    obs, _, done, info = env.step(msgs, "<python>\nwhile True:\n    pass\n</python>")
    assert not done and info["tool_status"] == "timeout" and info["tool_seconds"] < 3
    assert "[killed: it ran past 1 s]" in obs
    obs, _, done, info = env.step(msgs, "<python>\nx = bytearray(10**9)\n</python>")
    assert not done and info["tool_status"] == "memory"
    assert "MemoryError" in obs and "[killed: it needed more than 128 MB of memory]" in obs


def test_a_call_past_the_budget_ends_the_episode_with_its_reason():
    env = python_env(max_tool_calls=1)
    msgs = env.reset(example()) + [
        {"role": "assistant", "content": "<python>print(1)</python>"},
        {"role": "tool", "content": "\n<output>\n1\n</output>\n"},
    ]
    obs, reward, done, info = env.step(msgs, "<python>print(2)</python>")
    assert (obs, reward, done, info["reason"]) == (None, None, True, "tool_budget_exceeded")
    assert info["detail"] == "tool call 2 past env.max_tool_calls=1"
