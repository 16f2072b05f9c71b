import json

import pytest

from thinkrl.cli import main
from thinkrl.eval.report import ReportError, build_report


def make_run(path, steps=20):
    path.mkdir()
    rows = [
        {
            "step": s,
            "reward": s / 20,
            "accuracy": s / 40,
            "kl": 0.01 * s,
            "response_len_mean": 20 + s,
            "response_len_max": 30 + s,
            "reflection_rate": 0.0 if s < 10 else 0.5,
        }
        for s in range(1, steps + 1)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    evals = [
        {
            "step": 0,
            "label": "before",
            "accuracy": 0.1,
            "format_rate": 0.9,
            "response_len_mean": 20.0,
            "n": 8,
        },
        {
            "step": 20,
            "label": "after",
            "accuracy": 0.6,
            "format_rate": 1.0,
            "response_len_mean": 40.0,
            "n": 8,
        },
    ]
    (path / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    return path


def test_report_writes_markdown_and_one_png_per_curve(tmp_path):
    run = make_run(tmp_path / "run")
    md = build_report(run)
    assert md == run / "report" / "report.md"
    for stem in ("reward", "accuracy", "kl", "length", "reflection"):
        png = run / "report" / f"{stem}.png"
        assert png.read_bytes()[:4] == b"\x89PNG", stem
        assert f"]({stem}.png)" in md.read_text()
    text = md.read_text()
    # 20 steps: windows of 2. reward first (0.05 + 0.10) / 2 = 0.075, last (0.95 + 1.0) / 2 = 0.975
    assert "| reward | 0.075 | 0.975 |" in text
    # reflection: steps 1-2 have 0, steps 19-20 have 0.5
    assert "| reflection_rate | 0.000 | 0.500 |" in text
    assert "| 20 | after | 0.600 | 1.000 | 40.000 | 8 |" in text


def test_report_says_what_is_missing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    text = build_report(run, tmp_path / "out").read_text()
    assert "![reward (mean over samples)](reward.png)" in text
    assert "KL is logged when algo.kl_coef > 0" in text
    assert not (tmp_path / "out" / "kl.png").exists()


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: d / "nope", "run folder not found: {d}/nope"),
        (lambda d: d, "{d} has no metrics.jsonl with steps yet"),
        (
            lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n{"step"') and d,
            "{d}/metrics.jsonl:2: not valid JSON",
        ),
    ],
)
def test_report_errors_are_one_line(tmp_path, capsys, setup, message):
    run = setup(tmp_path)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("thinkrl: error: ") and message.format(d=tmp_path) in err[0]
    with pytest.raises(ReportError):
        build_report(run)


def test_report_command(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["report", str(run), f"output={tmp_path / 'r'}"]) == 0
    assert f"wrote {tmp_path / 'r' / 'report.md'}" in capsys.readouterr().out
    assert main(["report"]) == 2


def test_a_monitored_run_gets_the_gold_and_proxy_curve_against_kl(tmp_path):
    import json

    import yaml

    from thinkrl.eval.report import build_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"monitor": {"gold": "accuracy", "proxy": "rm", "window": 3}})
    )
    rows = [
        {
            "step": i,
            "reward": 0.1 * i,
            "reward/accuracy": [0.1, 0.3, 0.4, 0.3, 0.2][i - 1],
            "reward/rm": 0.2 * i,
            "kl": 0.01 * i,
        }
        for i in range(1, 6)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = build_report(run)
    assert (md.parent / "gold_proxy.png").stat().st_size > 1000
    assert "gold and proxy reward (over-optimisation)" in md.read_text()


def test_a_run_without_a_monitor_has_no_gold_and_proxy_curve(tmp_path):
    import json

    from thinkrl.eval.report import build_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    md = build_report(run)
    assert not (md.parent / "gold_proxy.png").exists()
