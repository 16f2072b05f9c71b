"""Each registered reward on a right, a wrong and a malformed completion, plus hand-worked cases."""

import time
from types import SimpleNamespace

import pytest

from thinkrl.config import ConfigError, build_config
from thinkrl.rewards import REWARDS, RewardModel, extract_final
from thinkrl.tasks import Example

EXACT = SimpleNamespace(check=lambda pred, ex: pred == ex.answer)


def ex(answer, **meta):
    return Example(question="q", answer=answer, meta=meta, source=EXACT)


def r(name, completion, example, **kw):
    return REWARDS.get(name)(completion, example, **kw)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<answer>\\boxed{12}</answer>", "12"),
        ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
        ("\\boxed{a} then \\boxed{b}", "b"),
        ("<answer>7</answer> and \\boxed{8}", "7"),  # the answer tag wins
        ("\\boxed{unclosed", None),
        ("nothing", None),
    ],
)
def test_extract_final(text, expected):
    assert extract_final(text) == expected


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        ("<think>x</think><answer>\\frac{1}{2}</answer>", "0.5", 1.0),  # right, symbolically
        ("the result is \\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
        ("<answer>0.4</answer>", "0.5", 0.0),  # wrong
        ("I believe it's one half", "0.5", 0.0),  # malformed: no answer tag, no box
        ("<answer>965/5</answer>", "193", 1.0),  # the loophole that `exact` closes (see below)
    ],
)
def test_math(completion, gold, expected):
    assert r("math", completion, ex(gold)) == expected


@pytest.mark.parametrize("bomb", ["9**9**9**9", "9^{9^{9^{9}}}", "\\boxed{10^{10^{10^{10}}}}"])
def test_exponent_bombs_fail_within_the_time_limit(bomb):
    rm = RewardModel({"math": 1.0, "exact": 1.0}, {"math": {"timeout": 2.0}})
    t0 = time.monotonic()
    totals, parts = rm.score([f"<answer>{bomb}</answer>"], [ex("193")])
    assert time.monotonic() - t0 < 2.0 + 3.0  # deadline + worker kill; the restart is lazy
    assert totals == [0.0] and parts == {"math": [0.0], "exact": [0.0]}
    assert sum(rm.failures.values()) <= 1  # a timeout is counted (sympy may also refuse quickly)


def test_math_timeout_is_counted_and_the_pool_recovers():
    rm = RewardModel({"math": 1.0}, {"math": {"timeout": 1.0}})
    totals, _ = rm.score(["<answer>9**9**9**9</answer>", "<answer>2</answer>"], [ex("193"), ex("2")])
    assert totals == [0.0, 1.0]
    assert dict(rm.failures) == {"math/timeout": 1}


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        ("<answer>193</answer>", "193", 1.0),
        ("<answer>1,000.0</answer>", "1000", 1.0),
        ("<answer>965/5</answer>", "193", 0.0),  # not evaluated
        ("<answer>192</answer>", "193", 0.0),
        ("193", "193", 0.0),  # malformed: no tag
    ],
)
def test_exact(completion, gold, expected):
    assert r("exact", completion, ex(gold)) == expected


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        ("<answer>B</answer>", "B", 1.0),
        ("<answer>(B) Paris</answer>", "B", 1.0),
        ("<answer>I think the answer is B</answer>", "(B)", 1.0),
        ("<answer>C</answer>", "B", 0.0),
        ("<answer>A or B</answer>", "B", 0.0),  # hedging across options is not lucky
        ("B", "B", 0.0),  # malformed
    ],
)
def test_choice(completion, gold, expected):
    assert r("choice", completion, ex(gold)) == expected


def test_choice_cannot_judge_a_non_letter_reference():
    assert r("choice", "<answer>B</answer>", ex("Paris")) is None


@pytest.mark.parametrize(
    "completion,target,expected",
    [
        ("<think>two plus two is four</think><answer>4</answer>", "en", 1.0),
        (
            "<think>二加二 is four</think><answer>4</answer>",
            "en",
            2 / 5,
        ),  # 3 CJK words of 5: 二 加 二 is four
        ("<think>二加二等于四</think><answer>4</answer>", "zh", 1.0),
        ("<think>二加二等于四</think><answer>4</answer>", "en", 0.0),
        ("<think>2 + 2 = 4</think><answer>4</answer>", "en", None),  # malformed: no words to judge
    ],
)
def test_language(completion, target, expected):
    assert r("language", completion, ex("4"), target=target) == expected


def test_language_target_from_the_example():
    assert r("language", "<think>二加二等于四</think>", ex("4", language="zh")) == 1.0


# ---------------------------------------------------------------------------
# Kimi k1.5 length reward, worked by hand


def test_kimi_length_hand_worked_group():
    # lengths 10, 20, 30, 50: min 10, max 50, lambda = 0.5 - (len - 10) / 40
    #   10 -> 0.5, 20 -> 0.25, 30 -> 0.0, 50 -> -0.5
    # correctness: right, wrong, right, wrong
    #   right 10 -> 0.5; wrong 20 -> min(0, 0.25) = 0; right 30 -> 0.0; wrong 50 -> -0.5
    e = ex("4")
    texts = ["<answer>4</answer>", "<answer>5</answer>", "<answer>4</answer>", "<answer>6</answer>"]
    out = REWARDS.get("kimi_length")(texts, [e] * 4, num_tokens=[10, 20, 30, 50])
    assert out == pytest.approx([0.5, 0.0, 0.0, -0.5], abs=1e-12)


def test_kimi_length_in_the_reward_model_uses_groups_and_characters():
    # no token counts: lengths in characters. Group 1: "<answer>4</answer>" (18 chars, right),
    # "<answer>4 </answer>" (19, right) -> lambdas 0.5, -0.5. Group 2: equal lengths -> 0, 0.
    a, b = ex("4"), ex("7")
    texts = ["<answer>4</answer>", "<answer>4 </answer>", "<answer>1</answer>", "<answer>2</answer>"]
    rm = RewardModel({"kimi_length": 1.0})
    totals, _ = rm.score(texts, [a, a, b, b], group_size=2)
    assert totals == pytest.approx([0.5, -0.5, 0.0, 0.0], abs=1e-12)
    # the same groups inferred from adjacent shared examples
    assert rm.score(texts, [a, a, b, b])[0] == totals


def test_kimi_length_wrong_answers_never_gain():
    # lengths 100 (wrong) and 300 (wrong): lambdas 0.5, -0.5 -> min(0, .) = 0, -0.5
    out = REWARDS.get("kimi_length")(["x", "y"], [ex("4")] * 2, num_tokens=[100, 300])
    assert out == pytest.approx([0.0, -0.5], abs=1e-12)


# ---------------------------------------------------------------------------
# DAPO overlong, repetition, hedging


@pytest.mark.parametrize(
    "n,expected",
    [
        (50, 0.0),  # L_max = 100, L_cache = 20: safe up to 80
        (80, 0.0),
        (90, -0.5),  # (80 - 90) / 20
        (100, -1.0),
        (120, -1.0),
    ],
)
def test_overlong(n, expected):
    assert r("overlong", "text", ex("4"), num_tokens=n, max_tokens=100, buffer=20) == pytest.approx(expected)


def test_overlong_without_token_counts_cannot_judge():
    assert r("overlong", "text", ex("4")) is None


def test_overlong_through_the_model_gets_context():
    rm = RewardModel({"overlong": 1.0})
    totals, _ = rm.score(["a", "b"], [ex("4")] * 2, context={"num_tokens": [10, 128], "max_tokens": 128})
    assert totals == pytest.approx([0.0, -1.0])  # default buffer 32: safe up to 96


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("one two three four five", 0.0),  # no repeated trigram
        ("a b c a b c", -1 / 4),  # trigrams: abc bca cab abc -> 1 repeat of 4
        ("go go go go go go", -3 / 4),  # 4 trigrams, all the same -> 3 repeats
        ("hi", 0.0),  # malformed/short: nothing to repeat
    ],
)
def test_repetition(completion, expected):
    assert r("repetition", completion, ex("4")) == pytest.approx(expected)


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("<think>maybe 4?</think><answer>4</answer>", 1.0),  # right, confident (doubt in the CoT is fine)
        ("<think>x</think> I'm not sure, but <answer>4</answer>", 0.75),  # right, hedged
        ("<think>x</think> Probably <answer>5</answer>", 0.0),  # wrong, hedged
        ("<think>x</think><answer>5</answer>", -1.0),  # wrong, confident
        ("I don't know", 0.0),  # malformed (no answer), hedged
    ],
)
def test_hedging(completion, expected):
    assert r("hedging", completion, ex("4")) == expected


def test_confident_wrong_scores_below_hedged_wrong():
    e = ex("4")
    assert r("hedging", "<answer>5</answer>", e) < r("hedging", "maybe <answer>5</answer>", e)


# ---------------------------------------------------------------------------
# Code (stdin/stdout and assertion tests; the adversarial set is in tests/sandbox)

IO = {
    "io_cases": [
        {"input": "2 3\n", "output": "5\n"},
        {"input": "10 -4\n", "output": "6"},
        {"input": "0 0\n", "output": "0\n"},
    ]
}
ADD_TESTS = (
    "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(0, 0) == 0\n"
    "    assert candidate(-1, 1) == 0\n    assert candidate(2, 2) == 4\n"
)


@pytest.mark.parametrize(
    "completion,mode,expected",
    [
        ("```python\na, b = map(int, input().split())\nprint(a + b)\n```", "pass", 1.0),
        ("```python\na, b = map(int, input().split())\nprint(abs(a) + abs(b))\n```", "pass", 0.0),
        ("```python\na, b = map(int, input().split())\nprint(abs(a) + abs(b))\n```", "fraction", 2 / 3),
        ("I would add the numbers.", "pass", 0.0),  # malformed: no code
    ],
)
def test_code_stdin_stdout(completion, mode, expected):
    assert r("code", completion, ex("", **IO), mode=mode) == pytest.approx(expected)


@pytest.mark.parametrize(
    "completion,mode,expected",
    [
        ("```python\ndef add(a, b):\n    return a + b\n```", "pass", 1.0),
        # a * b: 1*2 != 3, 0*0 == 0, -1*1 != 0, 2*2 == 4 -> 2 of 4
        ("```python\ndef add(a, b):\n    return a * b\n```", "fraction", 2 / 4),
        ("```python\ndef add(a, b):\n    return a * b\n```", "pass", 0.0),
        ("<answer>    return a + b</answer>", "pass", 1.0),  # a bare body gets the prompt's signature
        ("<answer>return a + b</answer>", "pass", 1.0),  # ... and is indented under it
        ("```python\ndef add(a, b) return\n```", "pass", 0.0),  # malformed: syntax error
    ],
)
def test_code_assertion_tests(completion, mode, expected):
    e = ex("", tests=ADD_TESTS, entry_point="add", prompt="def add(a, b):\n")
    assert r("code", completion, e, mode=mode) == pytest.approx(expected)


def test_code_on_a_non_code_example_cannot_judge():
    assert r("code", "```python\nprint(1)\n```", ex("4")) is None


# ---------------------------------------------------------------------------
# Options, user rewards


def test_reward_args_are_checked_against_the_reward():
    with pytest.raises(
        ConfigError, match="reward_args.code.modee: unknown option; 'code' takes: memory_mb, mode, timeout"
    ):
        build_config(overrides=["rewards.code=1", "reward_args.code.modee=fraction"])
    with pytest.raises(ConfigError, match="reward_args.math: 'math' is not in rewards"):
        build_config(overrides=["reward_args.math.timeout=3"])
    cfg = build_config(overrides=["rewards.code=1", "reward_args.code.mode=fraction"])
    assert cfg.reward_args == {"code": {"mode": "fraction"}}


def test_user_reward_from_a_file(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text(
        "CALLS = []\n\ndef short(completion, example):\n    CALLS.append(1)\n"
        "    return 1.0 if len(completion) < 5 else 0.0\n"
    )
    ref = f"{f}:short"
    cfg = build_config(overrides=[f"rewards={{{ref}: 0.5}}"])
    assert cfg.rewards[ref] == 0.5 and cfg.rewards["accuracy"] == 1.0  # merged with the defaults
    rm = RewardModel({ref: 2.0})
    totals, parts = rm.score(["abc", "abcdefgh", ""], [ex("4")] * 3)
    assert totals == [2.0, 0.0, 2.0] and parts[ref] == [1.0, 0.0, 1.0]
    assert RewardModel({ref: 1.0}).fns[ref] is rm.fns[ref]  # loaded once


def test_user_reward_errors_are_clear(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def good(completion, example):\n    return 1.0\n")
    with pytest.raises(ConfigError, match=r"file not found: .*missing\.py"):
        RewardModel({f"{tmp_path}/missing.py:fn": 1.0})
    with pytest.raises(ConfigError, match="has no function 'bad'; functions there: good"):
        RewardModel({f"{f}:bad": 1.0})


def test_group_reward_errors_score_zero_and_are_counted():
    from thinkrl.rewards import group_reward

    @REWARDS.register("test_broken_group_reward")
    @group_reward
    def broken(completions, examples):
        return [1.0]  # wrong length for any group bigger than one

    rm = RewardModel({"test_broken_group_reward": 1.0})
    totals, _ = rm.score(["a", "b", "c"], [ex("4")] * 3, group_size=3)
    assert totals == [0.0, 0.0, 0.0]
    assert dict(rm.failures) == {"test_broken_group_reward/error": 3}
