"""DAPO dynamic sampling (Yu et al. 2025, "DAPO", section 3.2).

A group whose G rewards are all equal (all right or all wrong) has zero advantage
under GRPO: it adds nothing to the policy gradient but still dilutes the batch. DAPO
drops such groups and draws more prompts until the batch is full again. Here each
extra round draws as many prompts as groups are missing, and at most ``max_rounds``
extra rounds run per step: past the cap the step trains on the groups it has
(possibly none), so a task the model always or never solves cannot stall training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from thinkrl.rollout import Rollout


@dataclass
class Groups:
    """Scored rollouts of some prompts; the G samples of group g are rows g*G .. g*G+G-1."""

    examples: list  # [n] one per group
    rendered: list  # [n] (prompt text, prefill)
    ro: Rollout  # [n * G] sequences
    texts: list[str]  # [n * G] prefill + completion: what the rewards saw
    totals: list[float]  # [n * G] total reward
    parts: dict[str, list[float]]  # reward name -> [n * G]

    def __len__(self) -> int:
        return len(self.examples)

    def group_size(self) -> int:
        return len(self.totals) // max(1, len(self.examples))

    def varied(self) -> list[int]:
        """Indices of the groups whose rewards are not all equal."""
        G = self.group_size()
        return [
            g
            for g in range(len(self))
            if max(self.totals[g * G : (g + 1) * G]) != min(self.totals[g * G : (g + 1) * G])
        ]

    def success(self) -> list[float]:
        """Per group, the share of samples judged right: the accuracy reward if there is one,
        else the share with a positive total reward."""
        G = self.group_size()
        hits = self.parts.get("accuracy") or [1.0 if t > 0 else 0.0 for t in self.totals]
        return [sum(hits[g * G : (g + 1) * G]) / G for g in range(len(self))]

    def select(self, groups: list[int]) -> Groups:
        G = self.group_size()
        rows = [g * G + j for g in groups for j in range(G)]
        return Groups(
            examples=[self.examples[g] for g in groups],
            rendered=[self.rendered[g] for g in groups],
            ro=self.ro.rows(rows),
            texts=[self.texts[i] for i in rows],
            totals=[self.totals[i] for i in rows],
            parts={k: [v[i] for i in rows] for k, v in self.parts.items()},
        )

    @staticmethod
    def concat(items: list[Groups]) -> Groups:
        def cat(get):
            return [x for it in items for x in get(it)]

        return Groups(
            examples=cat(lambda it: it.examples),
            rendered=cat(lambda it: it.rendered),
            ro=Rollout.concat([it.ro for it in items]),
            texts=cat(lambda it: it.texts),
            totals=cat(lambda it: it.totals),
            parts={k: cat(lambda it: it.parts[k]) for k in items[0].parts},
        )


def collect_groups(
    draw: Callable[[int], list], run: Callable[[list], Groups], n: int, *, dynamic: bool, max_rounds: int
) -> tuple[Groups, Groups, dict]:
    """Draw ``n`` prompts and ``run`` them (generate + score). Returns ``(kept, seen, stats)``:
    the groups to train on, every group generated this step (for logging and for the
    sampler's success tracking), and counts. Without ``dynamic``, kept is seen."""
    first = run(draw(n))
    if not dynamic:
        return first, first, {}
    seen = [first]
    kept = first.select(first.varied())
    rounds = 0
    while len(kept) < n and rounds < max_rounds:
        rounds += 1
        more = run(draw(n - len(kept)))
        seen.append(more)
        kept = Groups.concat([kept, more.select(more.varied())])
    everything = Groups.concat(seen)
    stats = {
        "dynamic_rounds": rounds,
        "dynamic_kept_groups": len(kept),
        "dynamic_generated_groups": len(everything),
    }
    return kept, everything, stats
