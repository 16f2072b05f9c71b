import uuid
from types import SimpleNamespace

import pytest

from thinkrl.rewards import REWARDS, RewardModel, extract_answer
from thinkrl.tasks import Example

accuracy = REWARDS.get("accuracy")
format_reward = REWARDS.get("format")

# A source whose check is plain string equality, independent of any task's normalisation.
EXACT = SimpleNamespace(check=lambda pred, ex: pred == ex.answer)
EX = Example(question="What is 2 + 2?", answer="4", source=EXACT)

RIGHT = "<think>2 + 2 = 4</think> <answer>4</answer>"
WRONG = "<think>2 + 2 = 5</think> <answer>5</answer>"
MALFORMED = "I think the answer is 4"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<answer> 42 </answer>", "42"),  # stripped
        ("<think>x</think><answer>1</answer> then <answer>2</answer>", "2"),  # the last one
        ("<answer>line 1\nline 2</answer>", "line 1\nline 2"),  # spans lines
        ("<answer></answer>", ""),
        ("no tags at all", None),
        ("<answer>unclosed", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text,acc,fmt",
    [
        (RIGHT, 1.0, 1.0),
        (WRONG, 0.0, 1.0),
        (MALFORMED, 0.0, 0.0),  # no tags: wrong and unformatted
        ("<think>\nsteps\n</think>\n<answer>\n4\n</answer>\n", 1.0, 1.0),  # newlines around tags are fine
        ("<answer>4</answer>", 1.0, 0.0),  # missing think
        ("<think>2 + 2 = 4</think> 4", 0.0, 0.0),  # missing answer tags
        ("<answer>4</answer> <think>2 + 2 = 4</think>", 1.0, 0.0),  # answer before think
        (RIGHT + " so 4.", 1.0, 0.0),  # trailing text
        ("Sure! " + RIGHT, 1.0, 0.0),  # leading text
        ("<think>a</think> <answer>5</answer><answer>4</answer>", 1.0, 0.0),  # duplicated answer: last counts
        ("<think><think>a</think></think> <answer>4</answer>", 1.0, 0.0),  # nested think
        ("<think>a</think> <answer><answer>4</answer>", 0.0, 0.0),  # nested opening tag: answer "<answer>4"
        ("<think></think> <answer>4</answer>", 1.0, 0.0),  # empty think
        ("<think>a</think> <answer></answer>", 0.0, 0.0),  # empty answer
    ],
)
def test_accuracy_and_format(text, acc, fmt):
    assert accuracy(text, EX) == acc
    assert format_reward(text, EX) == fmt


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("<think>a</think> <answer>4</answer></answer>", id="stray-closing-answer"),
        pytest.param(
            "<think>a <answer>5</answer></think> <answer>4</answer>", id="answer-block-inside-think"
        ),
        pytest.param("<think>a</think> <answer>4</think></answer>", id="stray-closing-think-in-answer"),
    ],
)
def test_format_rejects_duplicated_tags(text):
    assert format_reward(text, EX) == 0.0


def test_accuracy_without_a_source_cannot_judge():
    ex = Example(question="q", answer="4")  # source None: nothing can check it
    assert accuracy(RIGHT, ex) is None
    assert accuracy(MALFORMED, ex) == 0.0  # no answer at all is still wrong


def test_reward_model_weights_and_parts():
    rm = RewardModel({"accuracy": 1.0, "format": 0.1})
    totals, parts = rm.score([RIGHT, WRONG, MALFORMED], [EX] * 3)
    # right: 1*1 + 0.1*1 = 1.1;  wrong: 1*0 + 0.1*1 = 0.1;  malformed: 0
    assert totals == pytest.approx([1.1, 0.1, 0.0], abs=1e-12)
    assert parts == {"accuracy": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0]}
    assert not rm.failures


def test_reward_model_counts_errors_and_skips():
    raising, skipping = (f"test_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("raises", "none"))

    @REWARDS.register(raising)
    def _raises(completion, example):
        if "boom" in completion:
            raise RuntimeError("verifier bug")
        return 1.0

    @REWARDS.register(skipping)
    def _none(completion, example):
        return None if "?" in completion else 0.5

    rm = RewardModel({raising: 2.0, skipping: 1.0, "accuracy": 1.0})
    totals, parts = rm.score(["boom", "fine", "boom?", RIGHT], [EX] * 4)
    # "boom":  raises -> 0, skip-reward 0.5, accuracy 0 -> 0.5
    # "fine":  2*1 + 0.5 + 0 = 2.5
    # "boom?": raises -> 0, None -> 0, accuracy 0 -> 0
    # RIGHT:   2*1 + 0.5 + 1 = 3.5
    assert totals == pytest.approx([0.5, 2.5, 0.0, 3.5], abs=1e-12)
    assert parts[raising] == [0.0, 1.0, 0.0, 1.0]
    assert parts[skipping] == [0.5, 0.5, 0.0, 0.5]
    assert dict(rm.failures) == {f"{raising}/error": 2, f"{skipping}/skipped": 1}


def test_reward_model_unknown_name_lists_choices():
    from thinkrl.config import ConfigError

    with pytest.raises(ConfigError, match="unknown reward 'nope'; choose from: .*accuracy.*format"):
        RewardModel({"nope": 1.0})
