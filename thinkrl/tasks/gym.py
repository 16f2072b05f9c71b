"""reasoning-gym plumbing: which datasets a task draws from, and in what shares.

A task is a list of parts ``(dataset name, params, weight, level)``:

- ``task.name=chain_sum``: one part;
- ``task.name=mix`` with ``task.mixture=[{name, params, weight}, ...]``: a weighted mixture;
- ``task.levels=[0, 1, 2]``: the dataset's own curriculum (``reasoning_gym.create_curriculum``)
  at each global level, in equal shares; the level labels each example.
"""

from __future__ import annotations

from thinkrl.config import ConfigError, TaskConfig

# Part j draws its examples from seed + j * SEED_STRIDE, so part 0 of any task is the
# dataset a single-dataset task would draw, and parts never share a stream.
SEED_STRIDE = 7919


def gym_parts(cfg: TaskConfig) -> list[tuple[str, dict, float, int | None]]:
    from reasoning_gym.factory import DATASETS

    if cfg.name == "mix":
        parts = [
            (m["name"], dict(m.get("params") or {}), float(m.get("weight", 1.0)), None) for m in cfg.mixture
        ]
    elif cfg.levels:
        parts = [(cfg.name, _level_params(cfg.name, lvl, cfg.params), 1.0, lvl) for lvl in cfg.levels]
    else:
        parts = [(cfg.name, dict(cfg.params), 1.0, None)]
    for name, _, _, _ in parts:
        if name not in DATASETS:
            raise ConfigError(
                f"unknown task '{name}': not a reasoning-gym dataset and not a data file "
                "(.jsonl, .json, .csv, .parquet or a saved `datasets` folder). "
                f"reasoning-gym datasets: {', '.join(sorted(DATASETS))}"
            )
    return parts


def _level_params(name: str, level: int, params: dict) -> dict:
    """The dataset config at one global curriculum level, with ``params`` for the other fields."""
    import dataclasses

    from reasoning_gym.factory import create_curriculum, has_curriculum

    if not has_curriculum(name):
        raise ConfigError(f"task.levels: reasoning-gym dataset '{name}' has no curriculum")
    cur = create_curriculum(name)
    top = min(len(a.levels) for a in cur.attributes.values()) - 1
    if level > top:
        raise ConfigError(f"task.levels: '{name}' has curriculum levels 0..{top}, got {level}")
    cur.set_global_level(level)
    conf = cur.generate_configuration(dict(params))
    return {k: v for k, v in dataclasses.asdict(conf).items() if k not in ("seed", "size")}


def split_counts(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights``, largest remainders first (ties: earlier part).

    E.g. total 10, weights [1, 1, 1]: shares 3.33 each -> floors [3, 3, 3], one left over,
    which goes to the first part -> [4, 3, 3].
    """
    s = sum(weights)
    shares = [total * w / s for w in weights]
    counts = [int(x) for x in shares]
    by_remainder = sorted(range(len(weights)), key=lambda j: (-(shares[j] - counts[j]), j))
    for j in by_remainder[: total - sum(counts)]:
        counts[j] += 1
    return counts


def make_datasets(parts, train_n: list[int], eval_n: list[int], cfg: TaskConfig) -> list[tuple]:
    """One (training, held-out) pair of reasoning-gym datasets per part; the held-out one is
    drawn large so that questions also in training can be dropped and enough remain."""
    import reasoning_gym as rg

    out = []
    for j, (name, params, _, _) in enumerate(parts):
        try:
            train = rg.create_dataset(
                name, size=max(train_n[j], 1), seed=cfg.seed + j * SEED_STRIDE, **params
            )
            held = rg.create_dataset(
                name, size=eval_n[j] * 5 + 50, seed=cfg.eval_seed + j * SEED_STRIDE, **params
            )
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"task.params {params} rejected by reasoning-gym '{name}': {e}") from None
        out.append((train, held))
    return out
