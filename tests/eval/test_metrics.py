import math

import pytest

from thinkrl.eval.metrics import (
    majority_vote,
    pass_at_k,
    reflection_pattern,
    reflection_stats,
    thinking_text,
    vote_key,
)


@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (4, 1, 1, 0.25),  # pass@1 is c/n: 1 - C(3,1)/C(4,1) = 1 - 3/4
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 1 - 1/12
        (3, 2, 2, 1.0),  # n - c = 1 < k: every pair holds a right sample
        (8, 0, 4, 0.0),  # nothing right
        (8, 8, 1, 1.0),
        (200, 1, 100, 0.5),  # 1 - C(199,100)/C(200,100) = 1 - 100/200
    ],
)
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(50, 7, 10), (300, 20, 150), (1000, 3, 500)])
def test_pass_at_k_matches_the_closed_form_with_exact_binomials(n, c, k):
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)  # Python integers: exact, then one division
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_counts_equal_numbers_as_one_answer():
    # "3.0", "3" and "3.00" are one vote (3 votes) against "4" twice
    assert majority_vote(["4", "3.0", "4", "3", "3.00"]) == 1  # index of the first "3"-valued sample
    assert vote_key("1,000") == vote_key("1000.0") == "1000"
    assert vote_key("-0") == "0"
    assert vote_key(" Paris. ") == "paris"


def test_majority_vote_tie_rule_first_answer_given_wins():
    # "7" and "9" both have two votes; "9" was given first (index 0), so it wins
    assert majority_vote(["9", "7", "7", "9"]) == 0
    # three-way tie of single votes: the first sample's answer wins
    assert majority_vote(["a", "b", "c"]) == 0
    # missing answers do not vote: "5" (index 2) has one vote, the Nones none
    assert majority_vote([None, "", "5"]) == 2
    assert majority_vote([None, None]) is None


def test_thinking_text():
    assert thinking_text("<think> a wait b </think> <answer> 3 </answer>") == " a wait b "
    assert thinking_text("<think> never closed <answer> 3 </answer>") == " never closed "
    assert thinking_text("no tags, wait <answer> 3 </answer>") == "no tags, wait "


def test_reflection_words_in_the_thinking_only():
    pat = reflection_pattern(["wait", "let me verify", "re-check"])
    text = "<think> 3+4=7. Wait, let me  verify: re-check. awaiting </think> <answer> wait </answer>"
    # "Wait" (any case), "let me  verify" (any whitespace), "re-check"; not "awaiting"; not inside <answer>
    assert pat.findall(thinking_text(text)) == ["Wait", "let me  verify", "re-check"]
    stats = reflection_stats(
        [text, "<think> 3 </think> <answer> 3 </answer>"], ["wait", "let me verify", "re-check"]
    )
    assert stats == {"reflection_rate": 0.5, "reflection_per_response": 1.5}  # counts 3 and 0
    assert reflection_stats(["wait"], []) == {"reflection_rate": 0.0, "reflection_per_response": 0.0}
