import math

import pytest

from thinkrl.eval.calibration import bins_of, expected_calibration_error, reliability_diagram


def test_ece_hand_worked():
    # bins of width 0.5: [0.2, 0.4] -> conf 0.3, acc 0.5; [0.6, 1.0] -> conf 0.8, acc 1.0
    conf, ok = [0.2, 0.4, 0.6, 1.0], [True, False, True, True]
    assert bins_of(conf, ok, n_bins=2) == [(2, pytest.approx(0.3), 0.5), (2, pytest.approx(0.8), 1.0)]
    assert math.isclose(expected_calibration_error(conf, ok, n_bins=2), 0.5 * 0.2 + 0.5 * 0.2)
    assert expected_calibration_error([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [True])


def test_reliability_diagram_writes_a_png(tmp_path):
    png = reliability_diagram(
        {"before": ([0.2, 0.8], [False, True]), "after": ([0.9, 0.95], [False, True])}, tmp_path / "rel.png"
    )
    assert png.is_file() and png.stat().st_size > 1000


def test_answer_confidence_sums_the_answer_tokens(tiny_pair):
    from thinkrl.eval.calibration import answer_confidence

    _, tok = tiny_pair
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    head, ans, tail = enc("<think>ok</think> <answer>"), enc("42"), enc("</answer>")
    assert tok.decode(head + ans + tail) == "<think>ok</think> <answer>42</answer>"
    # the answer's tokens get -0.1, -0.2, ...; everything else a log-prob that would show
    logps = [-5.0] * len(head) + [-0.1 * (i + 1) for i in range(len(ans))] + [-7.0] * len(tail)
    want = math.exp(sum(-0.1 * (i + 1) for i in range(len(ans))))
    assert answer_confidence(head + ans + tail, logps, tok) == pytest.approx(want)
    assert answer_confidence(enc("no answer here"), [0.0] * len(enc("no answer here")), tok) is None


def test_write_reliability_draws_one_line_per_model_with_confidences(tmp_path, monkeypatch):
    import thinkrl.eval.calibration as cal
    from thinkrl.eval.calibration import write_reliability

    drawn = {}
    monkeypatch.setattr(cal, "reliability_diagram", lambda curves, path: drawn.update(curves) or path)
    rec = lambda c, ok: {"confidence": c, "correct": 1.0 if ok else 0.0}  # noqa: E731
    base = {"records": [rec(0.9, True), rec(None, True), rec(0.4, False)]}
    rl = {"records": [rec(0.99, False), rec(0.8, True)]}
    none = {"records": [rec(None, True)]}
    out = write_reliability([("base", base), ("rl", rl), ("base", rl), ("hf", none)], tmp_path / "r.png")
    assert out == tmp_path / "r.png"
    # the record without a confidence is left out; a model listed twice gets its position
    assert drawn == {
        "base": ([0.9, 0.4], [True, False]),
        "rl": ([0.99, 0.8], [False, True]),
        "base (#3)": ([0.99, 0.8], [False, True]),
    }
    assert write_reliability([("hf", none)], tmp_path / "x.png") is None


def test_write_reliability_writes_the_png(tmp_path):
    from thinkrl.eval.calibration import write_reliability

    res = {"records": [{"confidence": 0.7, "correct": 1.0}, {"confidence": 0.2, "correct": 0.0}]}
    png = write_reliability([("m", res)], tmp_path / "r.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
