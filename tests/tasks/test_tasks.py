import json

import pytest

from thinkrl.config import ConfigError, TaskConfig
from thinkrl.tasks import DataError, JsonlTask, ReasoningGymTask, answers_match, build_task


@pytest.fixture(scope="module")
def chain_sum():
    return build_task(TaskConfig(name="chain_sum", train_size=40, eval_size=10))


def test_reasoning_gym_task_splits(chain_sum):
    assert isinstance(chain_sum, ReasoningGymTask)
    assert len(chain_sum.train) == 40 and len(chain_sum.eval) == 10
    assert all(ex.meta["split"] == "eval" for ex in chain_sum.eval)
    assert not {ex.question for ex in chain_sum.eval} & {ex.question for ex in chain_sum.train}


def test_held_out_set_drops_training_questions_in_a_small_question_space():
    # one-digit a +- b: at most 10 * 10 * 2 = 200 questions, so 150 training draws and the
    # eval draws collide and the collisions must be dropped
    params = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    task = build_task(TaskConfig(name="chain_sum", train_size=150, eval_size=10, params=params))
    train_q = {ex.question for ex in task.train}
    eval_q = [ex.question for ex in task.eval]
    assert len(eval_q) == 10 and len(set(eval_q)) == 10
    assert not train_q & set(eval_q)
    assert [ex.meta["index"] for ex in task.eval] != list(range(10))  # some draws were really dropped


def test_reasoning_gym_check_full_credit_only(chain_sum):
    for ex in chain_sum.train[:5] + chain_sum.eval[:5]:  # eval examples are checked against eval entries
        assert chain_sum.check(ex.answer, ex)
    ex = chain_sum.train[0]
    assert ex.answer not in ("0", "-0")
    wrong = ex.answer + "0"  # e.g. -14282 -> -142820, a different number containing the right one
    entry = chain_sum.ds[ex.meta["index"]]
    partial = chain_sum.ds.score_answer(answer=wrong, entry=entry)
    assert 0 < partial < 1  # reasoning-gym gives partial credit (len(answer) / len(wrong))
    assert chain_sum.check(wrong, ex) is False


def test_reasoning_gym_bad_params_are_config_errors():
    with pytest.raises(ConfigError, match="chain_sum"):
        build_task(
            TaskConfig(name="chain_sum", train_size=5, eval_size=2, params={"min_terms": 5, "max_terms": 2})
        )


def test_unknown_task_lists_datasets():
    with pytest.raises(ConfigError, match="unknown task 'nope_task'.*chain_sum"):
        build_task(TaskConfig(name="nope_task"))
    with pytest.raises(DataError, match="data file not found: data/x.csv"):  # CSV is a data format now
        build_task(TaskConfig(name="data/x.csv"))


def take(task, batches, n=4):
    return [[ex.question for ex in task.next_batch(n)] for _ in range(batches)]


def test_next_batch_walks_epochs_and_resumes():
    cfg = TaskConfig(name="chain_sum", train_size=10, eval_size=2, seed=3)
    full = take(build_task(cfg), 7)  # 28 draws over 10 examples: crosses two epoch boundaries
    flat = [q for b in full for q in b]
    questions = sorted(ex.question for ex in build_task(cfg).train)
    assert sorted(flat[:10]) == questions and sorted(flat[10:20]) == questions  # each epoch a permutation
    assert flat[:10] != flat[10:20]  # reshuffled per epoch

    first = build_task(cfg)
    take(first, 3)  # 12 draws: epoch 1, position 2
    state = first.state_dict()
    assert state == {"epoch": 1, "pos": 2}
    resumed = build_task(cfg)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives serialisation
    assert take(resumed, 4) == full[3:]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_task(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": 2 * i} for i in range(10)]
    rows.insert(4, "")  # a blank line is ignored
    rows.insert(6, {"question": "skipped", "answer": " "})  # an empty answer is skipped
    task = build_task(TaskConfig(name=str(write_jsonl(tmp_path / "add.jsonl", rows)), eval_size=50))
    assert isinstance(task, JsonlTask) and task.name == "add"
    # 10 usable rows; the held-out slice is min(eval_size, 10 // 5) = 2
    assert len(task.eval) == 2 and len(task.train) == 8
    assert not {e.question for e in task.eval} & {e.question for e in task.train}
    ex = next(e for e in task.train if e.question == "What is 3 + 3?")
    assert ex.answer == "6" and ex.source is task
    assert task.check(" 6.0 ", ex) and not task.check("7", ex)


def test_jsonl_task_with_eval_path(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(6)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"question": f"h{i}", "answer": str(i)} for i in range(5)])
    task = build_task(TaskConfig(name=str(train), eval_path=str(held), eval_size=3))
    assert [e.question for e in task.eval] == ["h0", "h1", "h2"]
    assert sorted(e.question for e in task.train) == [f"q{i}" for i in range(6)]
    assert all(e.source is task for e in task.eval)


@pytest.mark.parametrize(
    "lines,match",
    [
        (
            [
                '{"question": "a", "answer": "1"}',
                '{"question": "b", "answer": "2"}',
                '{"question": "c", "answer": ',
            ],
            r":3: not valid JSON",
        ),
        (['{"question": "a", "answer": "1"}', '{"question": "no answer"}'], r":2: .*'question' and 'answer'"),
        (['["question", "answer"]'], r":1: .*JSON object"),
        ([], r"holds no usable rows"),
        (['{"question": "a", "answer": ""}'], r"holds no usable rows"),
    ],
)
def test_jsonl_errors_name_the_file_and_line(tmp_path, lines, match):
    path = write_jsonl(tmp_path / "bad.jsonl", lines) if lines else tmp_path / "bad.jsonl"
    if not lines:
        path.write_text("")
    with pytest.raises(DataError, match=match) as e:
        build_task(TaskConfig(name=str(path)))
    assert str(path) in str(e.value)


def test_jsonl_missing_file(tmp_path):
    path = tmp_path / "missing.jsonl"
    with pytest.raises(DataError, match="data file not found") as e:
        build_task(TaskConfig(name=str(path)))
    assert str(path) in str(e.value)
    assert issubclass(DataError, ConfigError)


@pytest.mark.parametrize(
    "pred,gold,same",
    [
        ("965/5", "193", False),  # no symbolic evaluation
        ("1,000", "1000", True),
        ("3.0", "3", True),
        ("-0.50", "-.5", True),
        (" $42$. ", "42", True),
        ("Paris", "paris", True),
        ("New  York", "new york", True),
        ("4", "5", False),
        ("12", "1,2", True),  # commas are dropped before the numeric comparison
        ("abc", "abd", False),
        ("1000000001", "1000000000", False),  # exact comparison: no relative tolerance
    ],
)
def test_answers_match(pred, gold, same):
    assert answers_match(pred, gold) is same
