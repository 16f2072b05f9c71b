"""The LLM judge against a local OpenAI-style test server; rm reward normalisation."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from thinkrl.rewards import RewardModel
from thinkrl.rewards.learned import RunningStats, normalized, parse_verdict
from thinkrl.tasks import Example


class _Judge(BaseHTTPRequestHandler):
    """Answers by the prediction's text: 'right' -> CORRECT, 'wrong' -> INCORRECT, 'garbage' ->
    an unparseable reply, 'slow' -> sleeps past the client's timeout, 'flaky' -> one 500 first."""

    flaky_seen: set = set()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        pred = prompt.split("Answer to grade:\n", 1)[1].split("\n", 1)[0]
        if pred == "slow":
            time.sleep(1.5)
        if pred == "flaky" and prompt not in self.flaky_seen:
            self.flaky_seen.add(prompt)
            self.send_response(500)
            self.end_headers()
            return
        content = {
            "right": "Looks equal.\nVERDICT: CORRECT",
            "wrong": "VERDICT: INCORRECT",
            "garbage": "I think it is CORRECT probably",
            "flaky": "VERDICT: CORRECT",
            "slow": "VERDICT: CORRECT",
            "graded": "GRADE: 7/10",
        }.get(pred, "VERDICT: INCORRECT")
        out = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        try:
            self.wfile.write(out)
        except BrokenPipeError:  # the 'slow' client timed out and left
            pass

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def _ex():
    return Example(question="What is two plus two?", answer="4", meta={})


def test_verdicts_are_parsed_strictly():
    assert parse_verdict("reasoning...\nVERDICT: CORRECT", "verdict") == 1.0
    assert parse_verdict("VERDICT: INCORRECT\n\n", "verdict") == 0.0
    assert parse_verdict("VERDICT: CORRECT, I think", "verdict") is None
    assert parse_verdict("verdict: correct", "verdict") is None
    assert parse_verdict("VERDICT: CORRECT\nbut maybe not", "verdict") is None
    assert parse_verdict("GRADE: 7/10", "grade") == 0.7
    assert parse_verdict("GRADE: 11/10", "grade") is None
    assert parse_verdict("", "grade") is None


def test_the_judge_scores_right_wrong_garbage_and_timeouts(server):
    rm = RewardModel({"judge": 1.0}, {"judge": {"url": server, "timeout": 0.5, "retries": 1, "cache": False}})
    texts = [f"<think>x</think> <answer>{a}</answer>" for a in ("right", "wrong", "garbage", "slow", "flaky")]
    totals, parts = rm.score(texts, [_ex()] * 5, group_size=1)
    assert totals == [1.0, 0.0, 0.0, 0.0, 1.0]  # a retry gets past the one 500
    assert rm.failures["judge/skipped"] == 1  # garbage: no verdict, never 1
    assert rm.failures["judge/timeout"] == 1


def test_the_judge_grades_and_caches(server):
    rm = RewardModel({"judge": 1.0}, {"judge": {"url": server, "mode": "grade"}})
    totals, _ = rm.score(["<answer>graded</answer>"] * 2, [_ex()] * 2, group_size=1)
    assert totals == [0.7, 0.7]
    from thinkrl.rewards import learned

    assert sum(1 for k in learned._cache if k[0] == server) >= 1


def test_normalisations_hand_worked():
    assert normalized([1.0, 3.0], "group", "k") == pytest.approx([-1 / 2**0.5, 1 / 2**0.5], rel=1e-5)
    s = RunningStats()
    s.update([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5 and s.std == pytest.approx((5 / 3) ** 0.5)
    out = normalized([2.0, 4.0], "running", "fresh-key")  # stats of [2, 4]: mean 3, std sqrt 2
    assert out == pytest.approx([-1 / 2**0.5, 1 / 2**0.5], rel=1e-5)
