"""Tasks: where prompts come from and how a final answer is checked.

A task owns its data *and* its check, so the RL reward and the eval metric can
never drift apart (the nanochat habit). ``Task.check(pred, example)`` is binary.
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from thinkrl.config import ConfigError, TaskConfig

log = logging.getLogger(__name__)


class DataError(ConfigError):
    """Data the user gave that cannot be used (missing file, broken line, empty file)."""


@dataclass
class Example:
    question: str
    answer: str
    task: str = ""
    meta: dict = field(default_factory=dict)
    source: "Task | None" = field(default=None, repr=False, compare=False)  # owns check()


class Task:
    """A stream of training examples with a resumable position, plus a held-out set."""

    name: str

    def __init__(self, train: list[Example], eval_: list[Example], seed: int):
        if not train:
            raise DataError(f"task '{self.name}' has no training examples")
        self.train, self.eval = train, eval_
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
    """Any reasoning-gym dataset. The dataset's scorer decides; only a full score counts.

    reasoning-gym scorers give partial credit (e.g. 0.01 for a wrong number in the
    right form); an RLVR reward must be a yes/no, so anything below 1.0 is wrong.
    """

    def __init__(self, cfg: TaskConfig):
        import reasoning_gym as rg
        from reasoning_gym.factory import DATASETS

        self.name = cfg.name
        if cfg.name not in DATASETS:
            raise ConfigError(f"unknown task '{cfg.name}': not humaneval, a reasoning-gym dataset or a .jsonl file. "
                              f"reasoning-gym datasets: {', '.join(sorted(DATASETS))}")
        try:
            self.ds = rg.create_dataset(cfg.name, size=cfg.train_size, seed=cfg.seed, **cfg.params)
            self.eval_ds = rg.create_dataset(cfg.name, size=cfg.eval_size * 5 + 50, seed=cfg.eval_seed,
                                             **cfg.params)
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"task.params {cfg.params} rejected by reasoning-gym '{cfg.name}': {e}") from None
        train = [self._example(self.ds[i], i) for i in range(cfg.train_size)]
        seen = {ex.question for ex in train}
        eval_: list[Example] = []
        dropped = 0
        for i in range(len(self.eval_ds)):
            ex = self._example(self.eval_ds[i], i, split="eval")
            if ex.question in seen:
                dropped += 1
                continue
            seen.add(ex.question)
            eval_.append(ex)
            if len(eval_) == cfg.eval_size:
                break
        if dropped:
            log.info("held-out set: dropped %d questions that also occur in training", dropped)
        if len(eval_) < cfg.eval_size:
            log.warning("held-out set has only %d unseen questions (asked for %d); the task's question "
                        "space is small", len(eval_), cfg.eval_size)
        super().__init__(train, eval_, cfg.seed)

    def _example(self, entry: dict, idx: int, split: str = "train") -> Example:
        return Example(question=entry["question"], answer=str(entry["answer"]), task=self.name,
                       meta={"index": idx, "split": split}, source=self)

    def check(self, pred: str, ex: Example) -> bool:
        ds = self.ds if ex.meta.get("split", "train") == "train" else self.eval_ds
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


def read_jsonl(path: Path, name: str) -> list[Example]:
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    out, skipped = [], 0
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(row, dict) or "question" not in row or "answer" not in row:
            raise DataError(f"{path}:{n}: each line must be a JSON object with 'question' and 'answer' fields")
        if row["answer"] is None or str(row["answer"]).strip() == "":
            skipped += 1
            continue
        out.append(Example(question=str(row["question"]), answer=str(row["answer"]), task=name,
                           meta={"line": n}))
    if skipped:
        log.warning("%s: skipped %d rows with an empty answer", path, skipped)
    if not out:
        raise DataError(f"{path} holds no usable rows (need JSON lines with 'question' and 'answer')")
    return out


class JsonlTask(Task):
    def __init__(self, cfg: TaskConfig):
        path = Path(cfg.name).expanduser()
        self.name = path.stem
        rows = read_jsonl(path, self.name)
        if cfg.eval_path:
            eval_ = read_jsonl(Path(cfg.eval_path).expanduser(), self.name)[: cfg.eval_size]
            train = rows
        else:  # hold out a seeded slice of the file
            if len(rows) < 2:
                raise DataError(f"{path} has {len(rows)} usable row(s): too few to hold out an eval set; "
                                "add rows or give task.eval_path")
            order = list(range(len(rows)))
            random.Random(cfg.eval_seed).shuffle(order)
            k = min(cfg.eval_size, max(1, len(rows) // 5))
            eval_ = [rows[i] for i in order[:k]]
            train = [rows[i] for i in order[k:]]
        for ex in rows + eval_:
            ex.source = self
        super().__init__(train, eval_, cfg.seed)

    def check(self, pred: str, ex: Example) -> bool:
        return answers_match(pred, ex.answer)


def build_task(cfg: TaskConfig) -> Task:
    if cfg.name == "humaneval":
        from thinkrl.tasks.humaneval import HumanEvalTask

        return HumanEvalTask(cfg)
    if cfg.name.endswith(".jsonl"):
        return JsonlTask(cfg)
    if "/" in cfg.name or cfg.name.endswith((".json", ".csv", ".parquet")):
        raise ConfigError(f"task '{cfg.name}': only .jsonl files are supported as local data")
    return ReasoningGymTask(cfg)
