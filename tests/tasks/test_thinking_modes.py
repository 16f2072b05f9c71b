"""Qwen3's thinking modes (task.thinking=on|off|switch): prompts, the format reward per mode,
and accuracy per mode in evaluation, worked by hand on tiny-random's ChatML template and a tiny
Qwen3's template with the enable_thinking flag."""

import pytest

from thinkrl.config import TaskConfig
from thinkrl.rewards.format import format_reward
from thinkrl.rollout import Rollout
from thinkrl.tasks import Example, Task
from thinkrl.tasks.templates import render_prompt
from thinkrl.tasks.thinking import apply_modes, empty_thinking, question_mode, with_mode

Q = "What is 17 + 25?"
SHOT = {"question": "What is 7 + 8?", "response": "<think> 7 plus 8 is 15. </think> <answer> 15 </answer>"}


class Numbers(Task):
    name = "numbers"

    def __init__(self, train, eval_, seed):
        super().__init__(train, eval_, seed)
        for ex in train + eval_:
            ex.source = self  # the task owns the check

    def check(self, pred, ex):
        return pred.strip() == ex.answer


def numbers(n_train=40, n_eval=3):
    return Numbers(
        [Example(f"q{i}", str(i)) for i in range(n_train)],
        [Example(f"e{i}", str(i)) for i in range(n_eval)],
        seed=0,
    )


def test_switches_are_read_off_the_end_of_the_question_and_replaced_not_stacked():
    assert question_mode("a /think") == "on" and question_mode("a /no_think") == "off"
    assert question_mode("a") is None and question_mode("use /think later") is None
    ex = with_mode(with_mode(Example("a", "1"), "on"), "off")
    assert ex.question == "a /no_think" and ex.meta == {"thinking": "off"}


def test_on_and_off_give_every_example_the_mode():
    for setting, switch, mode in (
        ("on", "/think", "on"),
        ("off", "/no_think", "off"),
        ("no_think", "/no_think", "off"),
    ):
        task = numbers()
        apply_modes(task, setting)
        assert all(
            ex.question.endswith(" " + switch) and ex.meta["thinking"] == mode
            for ex in task.train + task.eval
        )
        assert len(task.eval) == 3


def test_switch_mixes_training_modes_by_share_and_evaluates_both_modes_per_question():
    task = numbers(n_train=400)
    apply_modes(task, "switch", share=0.25, seed=3)
    on = sum(ex.meta["thinking"] == "on" for ex in task.train)
    assert 70 <= on <= 130  # 400 draws at 1/4: mean 100, sd ~8.7
    again = numbers(n_train=400)
    apply_modes(again, "switch", share=0.25, seed=3)
    assert [ex.question for ex in again.train] == [
        ex.question for ex in task.train
    ]  # seeded: a resume sees the same
    assert [(ex.question, ex.meta["thinking"]) for ex in task.eval] == [
        ("e0 /think", "on"),
        ("e0 /no_think", "off"),
        ("e1 /think", "on"),
        ("e1 /no_think", "off"),
        ("e2 /think", "on"),
        ("e2 /no_think", "off"),
    ]


def test_demonstrations_follow_the_questions_mode(tiny_pair):
    tok = tiny_pair[1]
    cfg = TaskConfig(template="chat", system_prompt=None, prefill="<think>", fewshot=[SHOT])
    prompt, prefill = render_prompt(Q + " /no_think", tok, cfg)
    assert prompt == (
        "<|im_start|>user\nWhat is 7 + 8? /no_think<|im_end|>\n"
        "<|im_start|>assistant\n<think> </think> <answer> 15 </answer><|im_end|>\n"
        f"<|im_start|>user\n{Q} /no_think<|im_end|>\n<|im_start|>assistant\n<think>"
    )
    assert prefill == "<think>"
    prompt, _ = render_prompt(Q + " /think", tok, cfg)
    assert (
        "What is 7 + 8? /think<|im_end|>\n<|im_start|>assistant\n<think> 7 plus 8 is 15. </think>" in prompt
    )
    assert empty_thinking("<think>\na\nb</think> x") == "<think> </think> x"


@pytest.fixture(scope="module")
def qwen3_tok(tmp_path_factory):
    from thinkrl.models import build_tiny_model, load_model

    path = tmp_path_factory.mktemp("qwen3")
    build_tiny_model(path, "qwen3")
    return load_model(str(path))[1]


def test_the_templates_enable_thinking_flag_follows_the_mode(qwen3_tok):
    """Qwen3's template writes an empty block for enable_thinking=False: that block is the
    response's start (prefill, so the format reward sees it), and the task's own "<think>"
    prefill is not added a second time."""
    tok = qwen3_tok
    cfg = TaskConfig(template="chat", system_prompt=None, prefill="<think>", fewshot=[])
    msgs = [{"role": "user", "content": Q + " /no_think"}]
    plain = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert (
        off.startswith(plain) and off[len(plain) :] == "<think>\n\n</think>\n\n"
    )  # the template, read by hand
    assert render_prompt(Q + " /no_think", tok, cfg) == (off, "<think>\n\n</think>\n\n")
    msgs = [{"role": "user", "content": Q + " /think"}]
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert render_prompt(Q + " /think", tok, cfg) == (on + "<think>", "<think>")


def test_the_format_reward_checks_the_mode_asked_for():
    think = "<think> 17 and 25 make 42 </think> <answer> 42 </answer>"
    empty = "<think> </think> <answer> 42 </answer>"
    qwen_off = "<think>\n\n</think>\n\n<answer>42</answer>"
    on, off, none = (
        Example(Q, "42", meta={"thinking": "on"}),
        Example(Q, "42", meta={"thinking": "off"}),
        Example(Q, "42"),
    )
    assert [format_reward(c, on) for c in (think, empty, qwen_off)] == [1.0, 0.0, 0.0]
    assert [format_reward(c, off) for c in (think, empty, qwen_off)] == [0.0, 1.0, 1.0]
    # no mode asked: as before, any character inside the block will do (a space, line breaks)
    assert [format_reward(c, none) for c in (think, empty, qwen_off)] == [1.0, 1.0, 1.0]


class Scripted:
    """An engine that answers each prompt with the first reply whose key the prompt contains."""

    def __init__(self, tok, replies: dict[str, str]):
        self.tok, self.replies, self.batch_size = tok, replies, 8

    def generate_text(self, prompts, n, params):
        texts = [next(r for key, r in self.replies.items() if key in p) for p in prompts for _ in range(n)]
        ids = [self.tok(t, add_special_tokens=False).input_ids for t in texts]
        return Rollout(
            prompt_ids=[[0]] * len(texts), completion_ids=ids, texts=texts, truncated=[False] * len(texts)
        )


def test_evaluation_reports_accuracy_form_and_length_per_mode(tiny_pair):
    """Two questions in both modes. Thinking: q0 right, q1 wrong, both well formed. Not
    thinking: both right, q1 with thinking it should not have (format 0). By hand: on 1/2
    accuracy and 2/2 format; off 2/2 and 1/2."""
    from thinkrl.eval import evaluate, format_mode_table

    tok = tiny_pair[1]
    task = Numbers(
        [Example("x", "0")], [Example("What is 1 + 1?", "2"), Example("What is 2 + 2?", "4")], seed=0
    )
    apply_modes(task, "switch")
    engine = Scripted(
        tok,
        {
            "1 + 1? /think": " one and one </think> <answer> 2 </answer>",
            "2 + 2? /think": " two and two </think> <answer> 5 </answer>",
            "1 + 1? /no_think": " </think> <answer> 2 </answer>",
            "2 + 2? /no_think": " four </think> <answer> 4 </answer>",
        },
    )
    res = evaluate(engine, tok, task.eval, TaskConfig(fewshot=[]), max_new_tokens=16)
    by = res["summary"]["by_mode"]
    assert (by["on"]["accuracy"], by["on"]["format_rate"], by["on"]["n"]) == (0.5, 1.0, 2)
    assert (by["off"]["accuracy"], by["off"]["format_rate"], by["off"]["n"]) == (1.0, 0.5, 2)
    lens = {k: len(tok(v, add_special_tokens=False).input_ids) for k, v in engine.replies.items()}
    assert by["off"]["response_len_mean"] == (lens["1 + 1? /no_think"] + lens["2 + 2? /no_think"]) / 2
    table = format_mode_table([("m", res["summary"])])
    assert table.splitlines()[2].split() == [
        "m",
        "off",
        "1.000",
        "0.500",
        f"{by['off']['response_len_mean']:.3f}",
        "2",
    ]
