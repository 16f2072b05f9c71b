"""``thinkrl report`` on a multi-turn run: the tool-call statistics."""

import json

from thinkrl.eval.report import build_report


def test_report_shows_tool_statistics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # 10 steps of 4 episodes: calls per episode 0.25 * s / 2, so 0.125 at step 1 and 1.25 at step 10
    rows = [
        {
            "step": s,
            "reward": 0.0,
            "generated_seqs": 4,
            "tool/calls_per_episode": 0.125 * s,
            "tool/episodes_with_call": 0.25 if s < 6 else 0.75,
            "tool/policy_tokens_mean": 30.0,
            "tool/over_budget": 1 if s == 10 else 0,
            "tool/killed_calls": 2 if s == 3 else 0,
        }
        for s in range(1, 11)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = build_report(run).read_text()
    assert "Tool calls (40 episodes over 10 steps):" in text
    # windows of one step; whole run: 0.125 * (1 + ... + 10) / 10 = 0.6875, rounded by the table's format
    assert "| calls per episode | 0.125 | 1.250 | 0.688 |" in text
    assert "| share of episodes using the tool | 0.250 | 0.750 | 0.500 |" in text
    assert "| episodes over the tool budget | | | 1 (2.5%) |" in text
    assert "| calls killed by a limit (time, memory, output) | | | 2 |" in text


def test_single_turn_report_has_no_tool_section(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    assert "Tool calls" not in build_report(run).read_text()
