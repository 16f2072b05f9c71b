"""Tasks: where prompts come from and how a final answer is checked.

A task owns its data *and* its check, so the RL reward and the eval metric can
never drift apart (the nanochat habit). ``Task.check(pred, example)`` is binary.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal

from thinkrl.config import ConfigError, TaskConfig
from thinkrl.registry import Registry

log = logging.getLogger(__name__)


class DataError(ConfigError):
    """Data the user gave that cannot be used (missing file, broken line, empty file)."""


@dataclass
class Example:
    question: str
    answer: str
    task: str = ""
    meta: dict = field(default_factory=dict)
    source: Task | None = field(default=None, repr=False, compare=False)  # owns check()


class Task:
    """A stream of training examples with a resumable position, plus a held-out set."""

    name: str

    def __init__(self, train: list[Example], eval_: list[Example], seed: int):
        if not train:
            raise DataError(f"task '{self.name}' has no training examples")
        self.train, self.eval = train, eval_
        for ex in train + eval_:
            if ex.source is None:
                ex.source = self  # the task's check() judges its own examples
        self.seed, self.epoch, self.pos = seed, 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.train)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self.train[self._order[self.pos]])
            self.pos += 1
        return out

    def keep(self, pred, why: str, split: str = "train") -> int:
        """Drop the ``split`` examples for which ``pred`` is false; log the count once, return it."""
        rows = self.train if split == "train" else self.eval
        kept = [ex for ex in rows if pred(ex)]
        dropped = len(rows) - len(kept)
        if dropped:
            log.warning("task '%s': skipped %d of %d %s rows: %s", self.name, dropped, len(rows), split, why)
        if split == "train":
            if not kept:
                raise DataError(f"task '{self.name}': no training rows left after skipping those with {why}")
            self.train = kept
            self._order = self._shuffled(self.epoch)
            self.pos = min(self.pos, len(self._order))
        else:
            self.eval = kept
        return dropped

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])
        self._order = self._shuffled(self.epoch)

    def check(self, pred: str, ex: Example) -> bool:
        raise NotImplementedError


# ---------------------------------------------------------------------------
# reasoning-gym


class ReasoningGymTask(Task):
    """One reasoning-gym dataset, several curriculum levels of one, or a weighted mixture.

    Each part is a (dataset name, params, weight, level); the training and held-out
    sets are split between the parts in proportion to their weights, so a mixture's
    proportions are exact rather than expected. The dataset's scorer decides; only a
    full score counts: reasoning-gym scorers give partial credit (e.g. 0.01 for a wrong
    number in the right form), and an RLVR reward must be a yes/no.
    """

    def __init__(self, cfg: TaskConfig):
        from thinkrl.tasks.gym import gym_parts, make_datasets, split_counts

        self.name = cfg.name
        parts = gym_parts(cfg)
        weights = [w for _, _, w, _ in parts]
        train_n, eval_n = split_counts(cfg.train_size, weights), split_counts(cfg.eval_size, weights)
        self.parts = make_datasets(parts, train_n, eval_n, cfg)  # [(train_ds, eval_ds)]
        train = [self._example(j, i) for j in range(len(parts)) for i in range(train_n[j])]
        seen = {ex.question for ex in train}
        eval_: list[Example] = []
        dropped = 0
        for j in range(len(parts)):
            got = 0
            for i in range(len(self.parts[j][1])):
                if got == eval_n[j]:
                    break
                ex = self._example(j, i, split="eval")
                if ex.question in seen:
                    dropped += 1
                    continue
                seen.add(ex.question)
                eval_.append(ex)
                got += 1
        if dropped:
            log.info("held-out set: dropped %d questions that also occur in training", dropped)
        if len(eval_) < cfg.eval_size:
            log.warning(
                "held-out set has only %d unseen questions (asked for %d); the task's question "
                "space is small",
                len(eval_),
                cfg.eval_size,
            )
        self._levels = [lvl for _, _, _, lvl in parts]
        self._names = [name for name, _, _, _ in parts]
        for ex in train + eval_:
            j = ex.meta["part"]
            ex.task = self._names[j]
            if self._levels[j] is not None:
                ex.meta["level"] = self._levels[j]
        super().__init__(train, eval_, cfg.seed)

    def _example(self, part: int, idx: int, split: str = "train") -> Example:
        entry = self.parts[part][0 if split == "train" else 1][idx]
        return Example(
            question=entry["question"],
            answer=str(entry["answer"]),
            task=self.name,
            meta={"index": idx, "split": split, "part": part},
            source=self,
        )

    @property
    def ds(self):
        return self.parts[0][0]

    @property
    def eval_ds(self):
        return self.parts[0][1]

    def check(self, pred: str, ex: Example) -> bool:
        train_ds, eval_ds = self.parts[ex.meta.get("part", 0)]
        ds = train_ds if ex.meta.get("split", "train") == "train" else eval_ds
        entry = ds[ex.meta["index"]]
        return ds.score_answer(answer=pred, entry=entry) >= 1.0


# ---------------------------------------------------------------------------
# Local JSONL files with question/answer fields


_NUM = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


def normalize_answer(s: str) -> str:
    s = s.strip().strip(".").strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    return re.sub(r"\s+", " ", s).lower()


def answers_match(pred: str, gold: str) -> bool:
    """Exact match after light normalisation, or equal numbers (no symbolic evaluation:
    an unevaluated "965/5" is not 193)."""
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p == g:
        return True
    p, g = p.replace(",", ""), g.replace(",", "")
    if _NUM.match(p) and _NUM.match(g):
        return Decimal(p) == Decimal(g)  # exact: 3.0 == 3, but 1000000001 != 1000000000
    return False


# Tasks by name, each a factory fn(TaskConfig) -> Task. A name that is not registered is a data
# file (.jsonl, .parquet, ...) or a reasoning-gym dataset.
TASKS: Registry = Registry("task")


@TASKS.register("humaneval")
def _humaneval(cfg: TaskConfig) -> Task:
    from thinkrl.tasks.humaneval import HumanEvalTask

    return HumanEvalTask(cfg)


def build_task(cfg: TaskConfig) -> Task:
    """The task ``cfg`` names, with pass-rate labels attached and filtered (see thinkrl.sampling)."""
    from thinkrl.sampling.difficulty import apply_pass_rates
    from thinkrl.tasks.files import FileTask, is_data_path
    from thinkrl.tasks.thinking import apply_modes

    if cfg.name in TASKS:
        task = TASKS.get(cfg.name)(cfg)
    else:
        task = FileTask(cfg) if is_data_path(cfg.name) else ReasoningGymTask(cfg)
    apply_modes(
        task, cfg.thinking, cfg.think_share, cfg.seed
    )  # before the pass rates: they join on the question
    apply_pass_rates(task, cfg)
    return task


def __getattr__(name: str):
    if name in ("FileTask", "JsonlTask", "read_rows"):  # lazy: files.py imports this module
        from thinkrl.tasks import files

        return getattr(files, "FileTask" if name == "JsonlTask" else name)
    raise AttributeError(name)
