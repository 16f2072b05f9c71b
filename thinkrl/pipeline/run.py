"""``thinkrl pipeline PIPELINE.yaml``: stages run in order, each one's model and data
feeding the next, resumable stage by stage.

DeepSeek-R1 (DeepSeek-AI 2025, section 2.3) is four stages: cold-start SFT,
reasoning RL, rejection sampling + SFT, and a final RL stage; R1-Zero is RL alone.
Kimi k1.5's long2short (Kimi Team 2025, section 2.4) is shortest-correct sampling,
SFT or DPO on the result, and weight merging. See ``configs/pipelines/``.

A stage is a mapping with ``name``, ``kind`` (sft | rl | sample | dpo | rm | merge | traces) and
that kind's config keys. ``model`` (and ``data``, ``models``) may name an earlier
stage, ``base`` (the pipeline's model) or a path; ``data: STAGE:pairs`` names the
preference pairs a sample stage with ``with_pairs: true`` wrote from the same samples. An ``rm``
stage trains a reward model (not a policy: the latest model stays what it was), and an RL
stage's ``reward_args.rm.path`` may name it.
By default a stage takes the latest model and the latest data.

Re-running a pipeline redoes only what changed. Each stage has a key: a hash of its
resolved config (every default filled in, the paths it reads included) and of the key
of the stage before it, so a change anywhere upstream reaches every later stage. A
finished stage leaves ``stage.json`` (its outputs and its key) and is skipped while its
key is unchanged; with another key it runs again from scratch, with a log line saying
which keys changed. A stage interrupted mid-way (an RL, SFT or DPO stage resumes from
its last checkpoint) continues only under the key it started with (``stage.key``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from thinkrl.config import Config, ConfigError, TaskConfig, build_config
from thinkrl.pipeline.merge import MergeConfig, run_merge
from thinkrl.pipeline.sample import SampleConfig, run_sample
from thinkrl.pipeline.traces import TracesConfig, write_traces
from thinkrl.trainer.checkpoint import write_atomic
from thinkrl.trainer.common import need, to_dict
from thinkrl.trainer.dpo import DPOConfig, train_dpo
from thinkrl.trainer.rm import RMConfig, train_rm
from thinkrl.trainer.sft import SFTConfig, train_sft

log = logging.getLogger(__name__)

KINDS = {
    "sft": SFTConfig,
    "rl": Config,
    "sample": SampleConfig,
    "dpo": DPOConfig,
    "rm": RMConfig,
    "merge": MergeConfig,
    "traces": TracesConfig,
}
PLACEHOLDER = "<from an earlier stage>"


@dataclass
class PipelineConfig:
    model: str = "smollm2-135m"
    output_dir: str = "runs/pipeline"
    dtype: str = "auto"
    device: str = "auto"  # of the held-out evaluations (thinkrl/device.py)
    seed: int = 0
    eval_n: int = 50  # held-out questions scored (greedy) after every model stage; 0: none
    eval_max_new_tokens: int = 128
    eval_backend: str = "fast"
    task: TaskConfig = field(default_factory=TaskConfig)  # shared by every stage unless a stage overrides it
    stages: list = field(default_factory=list)

    def validate(self) -> None:
        need(len(self.stages) >= 1, "a pipeline needs stages: a list of {name, kind, ...}")
        names = set()
        for i, st in enumerate(self.stages):
            need(
                isinstance(st, dict) and "name" in st and "kind" in st,
                f"stages[{i}] must be a mapping with 'name' and 'kind'",
            )
            need(
                st["kind"] in KINDS,
                f"stages[{i}] ('{st['name']}'): unknown stage kind '{st['kind']}'; "
                f"choose from: {', '.join(KINDS)}",
            )
            need(st["name"] not in names and st["name"] != "base", f"stage name '{st['name']}' is used twice")
            names.add(st["name"])
            stage_config(self, st, Path(PLACEHOLDER), {"model": PLACEHOLDER, "data": PLACEHOLDER}, {})


def _pick(ref, latest: str | None, outputs: dict, key: str, stage: str) -> str:
    if ref is None:
        if latest is None:
            raise ConfigError(
                f"stage '{stage}' has no {key}: give {key}=PATH or put a stage that makes one before it"
            )
        return latest
    ref = str(ref)
    stage_ = ref.removesuffix(":pairs")
    if stage_ != ref and stage_ in outputs:  # the pairs a sample stage wrote alongside its data
        if not outputs[stage_].get("pairs"):
            raise ConfigError(f"stage '{stage}': stage '{stage_}' wrote no pairs (give it with_pairs: true)")
        return outputs[stage_]["pairs"]
    if ref in outputs:
        if outputs[ref].get(key) is None:
            raise ConfigError(f"stage '{stage}': stage '{ref}' produced no {key}")
        return outputs[ref][key]
    return ref


def stage_config(cfg: PipelineConfig, st: dict, folder: Path, latest: dict, outputs: dict):
    """The stage's own config: pipeline defaults <- wiring from earlier stages <- the stage's keys."""
    kind, name = st["kind"], st["name"]
    keys = {k: v for k, v in st.items() if k not in ("name", "kind")}
    base: dict = {"task": to_dict(cfg.task), "dtype": cfg.dtype, "seed": cfg.seed}
    if kind == "traces":  # no model: the task and seed only
        del base["dtype"]
        base["output"] = str(folder / "data.jsonl")
    elif kind == "merge":
        base = {
            "models": [_pick(m, None, outputs, "model", name) for m in keys.pop("models", [])],
            "output_dir": str(folder),
        }
    else:
        base["model"] = _pick(keys.pop("model", None), latest["model"], outputs, "model", name)
    if kind in ("sft", "dpo", "rm"):
        base.update(
            data=_pick(keys.pop("data", None), latest["data"], outputs, "data", name), output_dir=str(folder)
        )
    if kind in ("sft", "dpo"):
        base["resume"] = (folder / "checkpoints").is_dir()
    elif kind == "sample":
        base["output"] = str(folder / "data.jsonl")
        if keys.pop("with_pairs", False):
            base["pairs_output"] = str(folder / "pairs.jsonl")
    elif kind == "rl":
        base.update(output_dir=str(folder), resume=(folder / "checkpoints").is_dir())
        rm_args = (keys.get("reward_args") or {}).get("rm") or {}
        if str(rm_args.get("path")) in outputs:  # the reward model an earlier rm stage trained
            keys = copy.deepcopy(keys)
            keys["reward_args"]["rm"]["path"] = _pick(rm_args["path"], None, outputs, "reward_model", name)
    layered = copy.deepcopy(base)
    for k, v in keys.items():
        if isinstance(v, dict) and isinstance(layered.get(k), dict):
            layered[k] = {**layered[k], **v}
            if k == "task" and "name" in v and "params" not in v:
                layered[k]["params"] = {}
        else:
            layered[k] = v
    try:
        return build_config(base=layered) if kind == "rl" else build_config(base=layered, cls=KINDS[kind])
    except ConfigError as e:
        raise ConfigError(f"stage '{name}' ({kind}): {e}") from None


def run_stage(kind: str, scfg, folder: Path) -> dict:
    """Run one stage; returns what it produced: {'model': path} and/or {'data': path}."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "sft":
        return {"model": str(train_sft(scfg))}
    if kind == "dpo":
        return {"model": str(train_dpo(scfg))}
    if kind == "rm":
        return {"reward_model": str(train_rm(scfg))}
    if kind == "merge":
        return {"model": str(run_merge(scfg))}
    if kind == "traces":
        return {"data": scfg.output, "trace_stats": write_traces(scfg)}
    if kind == "sample":
        stats = run_sample(scfg)
        if stats["rows"] == 0:
            raise ConfigError(
                f"sample stage kept no rows ({stats['reasons']}); sample more prompts or relax filters"
            )
        return {
            "data": scfg.output,
            "sample_stats": stats,
            **({"pairs": scfg.pairs_output} if scfg.pairs_output else {}),
        }
    from thinkrl.trainer.rl import train

    train(scfg)
    return {"model": str(folder / "final")}


def evaluate_model(cfg: PipelineConfig, model_path: str) -> dict:
    from thinkrl.eval import evaluate
    from thinkrl.models import load_model
    from thinkrl.rollout import engine_on
    from thinkrl.tasks import build_task

    task = build_task(cfg.task)
    model, tok = load_model(model_path)
    engine = engine_on(cfg.eval_backend, model, tok, batch_size=64, dtype=cfg.dtype, device_name=cfg.device)
    res = evaluate(engine, tok, task.eval[: cfg.eval_n], cfg.task, max_new_tokens=cfg.eval_max_new_tokens)
    return res["summary"]


def run_pipeline(cfg: PipelineConfig) -> list[dict]:
    """Run every stage that is not done under its current key; returns the report rows (base model first)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = [
        {
            "stage": "base",
            "kind": "-",
            "model": cfg.model,
            **_cached_eval(cfg, cfg.model, out / "base_eval.json"),
        }
    ]
    latest = {"model": cfg.model, "data": None}
    outputs: dict = {"base": {"model": cfg.model, "data": None}}
    key = ""
    for i, st in enumerate(cfg.stages):
        folder = out / f"{i + 1:02d}-{st['name']}"
        scfg = stage_config(cfg, st, folder, latest, outputs)
        key, resolved = stage_key(scfg, key)
        result = _finished(folder, st["name"], key, resolved)
        if result is None:
            if _clear_if_started_otherwise(folder, st["name"], key, resolved):
                scfg = stage_config(cfg, st, folder, latest, outputs)  # resume= follows the emptied folder
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / "stage.key", json.dumps({"key": key, "config": resolved}).encode())
            log.info("stage %s (%s): running in %s", st["name"], st["kind"], folder)
            result = {"name": st["name"], "kind": st["kind"], **run_stage(st["kind"], scfg, folder)}
            if "model" in result and cfg.eval_n:
                result["eval"] = evaluate_model(cfg, result["model"])
            write_atomic(
                folder / "stage.json",
                json.dumps({**result, "key": key, "config": resolved}, indent=2).encode(),
            )
        outputs[st["name"]] = result
        latest.update({k: result[k] for k in ("model", "data") if k in result})
        if "eval" in result:
            report.append(
                {"stage": st["name"], "kind": st["kind"], "model": result["model"], **result["eval"]}
            )
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


# Keys that change how a stage runs, not what it produces: they are left out of its key.
NOT_IN_KEY = ("resume", "progress")


def stage_key(scfg, previous: str) -> tuple[str, dict]:
    """The stage's key (a hash of its resolved config and of the previous stage's key) and
    the config it was made from (kept in the markers, to say what changed)."""
    resolved = json.loads(
        json.dumps({k: v for k, v in to_dict(scfg).items() if k not in NOT_IN_KEY}, default=str)
    )
    blob = json.dumps({"config": resolved, "after": previous}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], resolved


def _finished(folder: Path, name: str, key: str, resolved: dict) -> dict | None:
    """The outputs a finished stage recorded, when it finished under ``key``; else None."""
    marker = folder / "stage.json"
    if not marker.is_file():
        return None
    done = json.loads(marker.read_text())
    if done.get("key") == key:
        log.info("stage %s: done earlier with this config, skipped", name)
        return {k: v for k, v in done.items() if k not in ("key", "config")}
    log.info(
        "stage %s: %s: running it again", name, _what_changed(done.get("config"), resolved, "since it ran")
    )
    return None


def _clear_if_started_otherwise(folder: Path, name: str, key: str, resolved: dict) -> bool:
    """Empty a stage folder whose contents (checkpoints, a finished run) belong to another
    key: resuming them would continue a different run. True when it emptied one."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return False
    started = folder / "stage.key"
    before = json.loads(started.read_text()) if started.is_file() else {}
    if before.get("key") == key:
        return False  # the same stage, interrupted: it resumes
    if not (folder / "stage.json").is_file():  # _finished has already said why when there was a marker
        log.info(
            "stage %s: %s: starting it over",
            name,
            _what_changed(before.get("config"), resolved, "since it started"),
        )
    shutil.rmtree(folder)
    return True


def _what_changed(old: dict | None, new: dict, when: str) -> str:
    """A short account of how a stage's config changed ``when`` (``since it ran``), for the log."""
    if old is None:
        return "its config was not recorded (an older thinkrl)"
    a, b = _flatten(old), _flatten(new)
    changed = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if not changed:
        return f"an earlier stage changed {when}"
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:4])
    return f"its config changed {when} ({shown}{', ...' if len(changed) > 4 else ''})"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _cached_eval(cfg: PipelineConfig, model: str, path: Path) -> dict:
    if not cfg.eval_n:
        return {}
    if path.is_file():
        return json.loads(path.read_text())
    summary = evaluate_model(cfg, model)
    path.write_text(json.dumps(summary, indent=2))
    return summary


def format_report(rows: list[dict]) -> str:
    head = ["stage", "kind", "accuracy", "format_rate", "response_len_mean", "n"]
    body = [
        [str(r.get("stage")), str(r.get("kind"))]
        + [f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in head[2:]]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths)) for r in [head] + body)
