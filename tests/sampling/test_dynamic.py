import pytest

from thinkrl.rollout import Rollout
from thinkrl.sampling import Groups, collect_groups

G = 2
# rewards of the two samples of each prompt id; equal pairs teach GRPO nothing
TABLE = {0: [1, 1], 1: [0, 1], 2: [0, 0], 3: [1, 0], 4: [1, 1], 5: [0, 0], 6: [0, 1], 7: [1, 0]}


class Script:
    """Prompts are the ids 0, 1, 2, ... in order; ``run`` scores them from a fixed table."""

    def __init__(self, table):
        self.table, self.next_id, self.calls = table, 0, []

    def draw(self, n):
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        return ids

    def run(self, ids):
        self.calls.append(list(ids))
        totals = [float(r) for i in ids for r in self.table[i]]
        rows = [i for i in ids for _ in range(G)]
        texts = [f"p{i}-s{j}" for i in ids for j in range(G)]
        ro = Rollout(
            prompt_ids=[[i] for i in rows],
            completion_ids=[[i, j] for i in ids for j in range(G)],
            texts=texts,
            truncated=[False] * len(rows),
        )
        return Groups(list(ids), [(f"p{i}", "") for i in ids], ro, texts, totals, {"accuracy": totals})


def test_dynamic_sampling_refills_until_full():
    s = Script(TABLE)
    kept, seen, stats = collect_groups(s.draw, s.run, 3, dynamic=True, max_rounds=3)
    # round 0: ids 0 1 2 -> keeps 1; round 1: 2 missing, ids 3 4 -> keeps 3; round 2: id 5 -> nothing;
    # round 3: id 6 -> keeps 6: full at the cap
    assert s.calls == [[0, 1, 2], [3, 4], [5], [6]]
    assert kept.examples == [1, 3, 6]
    assert kept.texts == ["p1-s0", "p1-s1", "p3-s0", "p3-s1", "p6-s0", "p6-s1"]  # rows follow their groups
    assert kept.ro.completion_ids == [[1, 0], [1, 1], [3, 0], [3, 1], [6, 0], [6, 1]]
    assert kept.varied() == [0, 1, 2]  # no zero-variance group
    assert seen.examples == [0, 1, 2, 3, 4, 5, 6]
    assert seen.success() == [1.0, 0.5, 0.0, 0.5, 1.0, 0.0, 0.5]
    assert stats == {"dynamic_rounds": 3, "dynamic_kept_groups": 3, "dynamic_generated_groups": 7}


def test_dynamic_sampling_stops_at_its_cap():
    s = Script(TABLE)
    kept, _, stats = collect_groups(s.draw, s.run, 3, dynamic=True, max_rounds=2)
    assert s.calls == [[0, 1, 2], [3, 4], [5]]  # two extra rounds, then it trains on what it has
    assert kept.examples == [1, 3] and stats["dynamic_rounds"] == 2


@pytest.mark.parametrize("cap", [0, 1, 4])
def test_dynamic_sampling_never_yields_a_zero_variance_group(cap):
    s = Script({i: [i % 2, i % 2] for i in range(100)})  # every group is all-right or all-wrong
    kept, seen, stats = collect_groups(s.draw, s.run, 4, dynamic=True, max_rounds=cap)
    assert len(kept) == 0 and len(s.calls) == cap + 1 and stats["dynamic_rounds"] == cap
    assert len(seen) == 4 * (cap + 1)  # each extra round asked again for all 4 missing prompts


def test_without_dynamic_sampling_every_group_is_kept():
    s = Script(TABLE)
    kept, seen, stats = collect_groups(s.draw, s.run, 3, dynamic=False, max_rounds=3)
    assert kept is seen and kept.examples == [0, 1, 2] and stats == {}


def test_forced_token_masks_follow_their_rows():
    """A thinking budget's forced-token masks (Rollout.forced) stay with their completions when
    groups are selected and concatenated."""
    s = Script(TABLE)
    run = s.run

    def run_with_masks(ids):
        g = run(ids)
        g.ro.forced = [[i == 3, j == 1] for i in ids for j in range(G)]  # prompt 3 and sample 1 marked
        return g

    kept, _, _ = collect_groups(s.draw, run_with_masks, 3, dynamic=True, max_rounds=3)
    assert kept.examples == [1, 3, 6]
    assert kept.ro.forced == [
        [False, False],
        [False, True],
        [True, False],
        [True, True],
        [False, False],
        [False, True],
    ]
