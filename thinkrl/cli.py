"""The ``thinkrl`` command: parse, build, run.

thinkrl train [CONFIG.yaml] [key=value ...]
thinkrl eval  [CONFIG.yaml] model=PATH[,PATH...] [task=NAME] [n=N] [k=SAMPLES] [output=FILE]
              [thinking_budget=B1,B2,...] [key=value ...]
thinkrl sft    [CONFIG.yaml] model=NAME data=FILE.jsonl output_dir=DIR [key=value ...]
thinkrl sample [CONFIG.yaml] model=NAME output=FILE.jsonl [mode=all|shortest|pairs] [n=N] [key=value ...]
thinkrl dpo    [CONFIG.yaml] model=NAME data=FILE.jsonl [loss=dpo|ln_dpo|simpo] [key=value ...]
thinkrl rm     [CONFIG.yaml] model=NAME data=FILE.jsonl [margin=M] [key=value ...]
thinkrl merge  models=A,B[,...] [weights=WA,WB,...] output_dir=DIR
thinkrl pipeline PIPELINE.yaml [key=value ...]
thinkrl difficulty [CONFIG.yaml] model=PATH task=NAME [k=8] [n=N] output=FILE.jsonl [key=value ...]
thinkrl report RUN_DIR [output=DIR]
thinkrl push   FOLDER repo=OWNER/NAME [private=true]   (train, sft, dpo, rm also take push_to_hub=OWNER/NAME)
thinkrl sandbox check
thinkrl serve  model=PATH [host=127.0.0.1] [port=8000] [max_slots=32] [key=value ...]
thinkrl chat   model=PATH [thinking=on|off] [budget=N] [max_tokens=N] [key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from thinkrl.config import ConfigError

USAGE = __doc__


def _split(args: list[str]) -> tuple[str | None, list[str]]:
    """The optional leading CONFIG.yaml, then key=value overrides."""
    config = None
    if args and "=" not in args[0]:
        config, args = args[0], args[1:]
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ConfigError(f"expected key=value, got {bad[0]!r}")
    return config, args


def cmd_train(args: list[str]) -> int:
    from thinkrl.config import build_config
    from thinkrl.hub import pop_push_args, push_after
    from thinkrl.trainer.rl import train

    config, overrides = _split(args)
    overrides, push = pop_push_args(overrides)
    cfg = build_config(config, overrides)
    results = push_after(lambda: train(cfg), push, lambda _: Path(cfg.output_dir) / "final")
    before, after = results.get("before"), results.get("after")
    print(f"\nrun folder: {cfg.output_dir}")
    if before or after:
        from thinkrl.eval import format_table

        rows = [
            (f"{label} (step {r['step']})", r) for label, r in (("before", before), ("after", after)) if r
        ]
        print("held-out results (greedy):")
        print(format_table(rows))
        if before and after:
            delta = 100 * (after["accuracy"] - before["accuracy"])
            print(
                f"held-out accuracy: {100 * before['accuracy']:.1f}% -> {100 * after['accuracy']:.1f}% "
                f"({delta:+.1f} points)"
            )
    return 0


def _eval_base(model: str) -> dict:
    """When evaluating a checkpoint of a run, start from that run's config (same task)."""
    from thinkrl.config import load_yaml

    p = Path(model)
    for cand in (p / "config.yaml", p.parent / "config.yaml", p.parent.parent / "config.yaml"):
        if p.is_dir() and cand.is_file():
            data = load_yaml(cand)
            return {k: v for k, v in data.items() if k in ("task", "rollout", "eval", "dtype", "seed", "env")}
    return {}


def _model_args(items: list[str], short: dict) -> tuple[list[str], str | None, list[str]]:
    """Split ``model=a,b`` and ``output=...`` from the config overrides (with short aliases)."""
    models, output, overrides = [], None, []
    for item in items:
        key, value = item.split("=", 1)
        if key == "model":
            models += [m for m in value.split(",") if m]
        elif key == "output":
            output = value
        else:
            overrides.append(f"{short.get(key, key)}={value}")
    return models, output, overrides


def cmd_eval(args: list[str]) -> int:
    from thinkrl.config import build_config
    from thinkrl.envs.episodes import evaluate_episodes
    from thinkrl.eval import eval_settings, evaluate
    from thinkrl.eval.budget import parse_budgets
    from thinkrl.models import load_model
    from thinkrl.rollout import engine_on
    from thinkrl.tasks import build_task
    from thinkrl.tasks.templates import drop_long_prompts

    config, items = _split(args)
    budgets = None  # thinking_budget=32,64,...: one evaluation per budget
    for item in [i for i in items if i.startswith("thinking_budget=")]:
        budgets = parse_budgets(item.split("=", 1)[1])
        items.remove(item)
    models, output, overrides = _model_args(items, {"task": "task.name", "n": "eval.n", "k": "eval.samples"})
    if not models:
        raise ConfigError("thinkrl eval needs model=PATH (a built-in name, an HF folder or a .gguf file)")
    base = _eval_base(models[0]) if config is None else {}
    cfg = build_config(config, overrides, base=base)
    task = build_task(cfg.task)
    env = _eval_env(cfg, budgets)
    settings = eval_settings(cfg)
    k, temperature = settings["samples"], settings["temperature"]
    runs = []  # (model, its result, or its results per budget); a model may be listed twice
    for name in models:
        model, tok = load_model(name)
        drop_long_prompts(task, tok, cfg.task)
        engine = engine_on(
            cfg.rollout.backend,
            model,
            tok,
            batch_size=cfg.eval.batch_size,
            dtype=cfg.dtype,
            device_name=cfg.device,
        )

        def run(budget: int | None) -> dict:
            if env is not None:  # episodes in the environment, e.g. with the python tool
                return evaluate_episodes(engine, tok, env, task.eval[: cfg.eval.n], cfg, **settings)
            return evaluate(
                engine,
                tok,
                task.eval[: cfg.eval.n],
                cfg.task,
                **settings,
                thinking_budget=budget,
                progress=cfg.progress,
            )

        runs.append((name, {b: run(b) for b in budgets} if budgets else run(None)))
    how = "greedy" if temperature == 0 else f"{k} samples at temperature {temperature:g}"
    print(f"task: {cfg.task.name}  (held-out, {how})")
    output = Path(output or "eval_results.json")
    head = {"task": cfg.task.name, "samples": k, "temperature": temperature}
    if budgets:
        _report_budgets(runs, budgets, output, head)
    else:
        _report_runs(runs, output, head)
    print(f"wrote {output}")
    return 0


def _eval_env(cfg, budgets):
    """The multi-turn environment to evaluate in, or None for single-turn generation."""
    from thinkrl import sandbox
    from thinkrl.envs import build_env

    sandbox.configure(cfg.sandbox.allow_unconfined)
    env = build_env(cfg.env)
    if not env.multi_turn:
        return None
    if budgets:
        raise ConfigError(
            f"thinking_budget=... is not supported with env.name={cfg.env.name}; evaluate without it"
        )
    if getattr(env, "runs_code", False):
        sandbox.require_isolation()
    return env


def _report_runs(runs: list, output: Path, head: dict) -> None:
    """The table per model (and per thinking mode), the JSON results and the reliability plot."""
    from thinkrl.eval import format_mode_table, format_table, write_json
    from thinkrl.eval.calibration import write_reliability

    print(format_table([(name, res["summary"]) for name, res in runs]))
    by_mode = format_mode_table([(name, res["summary"]) for name, res in runs])
    if by_mode:
        print("\nper thinking mode (task.thinking):\n" + by_mode)
    write_json(output, {**head, "results": dict(runs)})
    png = write_reliability(runs, output.with_name(f"{output.stem}_reliability.png"))
    if png is not None:  # confidences need an engine that returns log-probs (rollout.backend=fast)
        print(f"wrote {png} (accuracy against the confidence in the final answer)")


def _report_budgets(
    runs: list[tuple[str, dict[int, dict]]], budgets: list[int], output: Path, head: dict
) -> None:
    """Print and save an eval over thinking budgets: the accuracy / length table, the JSON
    (results per model, then per budget) and ``budget_curve.png`` beside it."""
    from thinkrl.eval import write_json
    from thinkrl.eval.budget import format_budget_table, plot_budget_curve

    curves = [(name, {b: res["summary"] for b, res in by_budget.items()}) for name, by_budget in runs]
    print(format_budget_table(curves))
    write_json(
        output,
        {
            **head,
            "thinking_budgets": budgets,
            "results": {name: {str(b): res for b, res in by_budget.items()} for name, by_budget in runs},
        },
    )
    print(f"wrote {plot_budget_curve(curves, output.parent / 'budget_curve.png')}")


def _supervised(train_fn, cls, args: list[str]) -> Path:
    """Build the config, train, and push ``final/`` when ``push_to_hub=`` asks."""
    from thinkrl.config import build_config
    from thinkrl.hub import pop_push_args, push_after

    config, overrides = _split(args)
    overrides, push = pop_push_args(overrides)
    cfg = build_config(config, overrides, cls=cls)
    return push_after(lambda: train_fn(cfg), push, Path)


def cmd_push(args: list[str]) -> int:
    """Upload a model folder (a run's ``final/``, a checkpoint) to the Hugging Face Hub."""
    from thinkrl.hub import push_folder

    folder, items = _split(args)
    opts = dict(item.split("=", 1) for item in items)
    unknown = set(opts) - {"repo", "private"}
    if folder is None or "repo" not in opts or unknown:
        raise ConfigError("usage: thinkrl push FOLDER repo=OWNER/NAME [private=true]")
    private = opts.get("private", "false").lower()
    if private not in ("true", "false"):
        raise ConfigError(f"private: expected true or false, got {opts['private']!r}")
    print(f"pushed {folder} to {push_folder(folder, opts['repo'], private=private == 'true')}")
    return 0


def cmd_sft(args: list[str]) -> int:
    from thinkrl.trainer.sft import SFTConfig, train_sft

    print(f"wrote {_supervised(train_sft, SFTConfig, args)}")
    return 0


def cmd_dpo(args: list[str]) -> int:
    from thinkrl.trainer.dpo import DPOConfig, train_dpo

    print(f"wrote {_supervised(train_dpo, DPOConfig, args)}")
    return 0


def cmd_rm(args: list[str]) -> int:
    from thinkrl.trainer.rm import RMConfig, train_rm

    print(f"wrote {_supervised(train_rm, RMConfig, args)}")
    return 0


def cmd_sample(args: list[str]) -> int:
    import json

    from thinkrl.config import build_config
    from thinkrl.pipeline.sample import SampleConfig, run_sample

    cfg = build_config(*_split(args), cls=SampleConfig)
    print(json.dumps(run_sample(cfg), indent=2))
    print(f"wrote {cfg.output}")
    return 0


def cmd_merge(args: list[str]) -> int:
    from thinkrl.config import build_config
    from thinkrl.pipeline.merge import MergeConfig, run_merge

    config, items = _split(args)  # models=A,B and weights=1,0 are comma lists
    items = [
        f"{k}=[{v}]" if k in ("models", "weights") and not v.startswith("[") else f"{k}={v}"
        for k, v in (i.split("=", 1) for i in items)
    ]
    print(f"wrote {run_merge(build_config(config, items, cls=MergeConfig))}")
    return 0


def cmd_pipeline(args: list[str]) -> int:
    from thinkrl.config import build_config
    from thinkrl.pipeline.run import PipelineConfig, format_report, run_pipeline

    config, overrides = _split(args)
    if config is None:
        raise ConfigError("thinkrl pipeline needs a PIPELINE.yaml (see configs/pipelines/)")
    cfg = build_config(config, overrides, cls=PipelineConfig)
    print(format_report(run_pipeline(cfg)))
    print(f"report: {Path(cfg.output_dir) / 'report.json'}")
    return 0


def cmd_difficulty(args: list[str]) -> int:
    """Label training questions with a model's pass rate over k samples (Kimi k1.5's difficulty)."""
    from thinkrl.config import build_config
    from thinkrl.models import load_model
    from thinkrl.rollout import engine_on
    from thinkrl.sampling.difficulty import estimate_pass_rates, write_rows
    from thinkrl.tasks import build_task

    config, items = _split(args)
    k, n, rest = 8, None, []
    for item in items:
        key, value = item.split("=", 1)
        if key in ("k", "n"):
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
            k, n = (int(value), n) if key == "k" else (k, int(value))
        else:
            rest.append(item)
    models, output, overrides = _model_args(rest, {"task": "task.name"})
    if len(models) != 1 or not output:
        raise ConfigError("thinkrl difficulty needs one model=PATH and output=FILE.jsonl")
    cfg = build_config(config, overrides)
    task = build_task(cfg.task)
    model, tok = load_model(models[0])
    engine = engine_on(
        cfg.rollout.backend,
        model,
        tok,
        batch_size=cfg.rollout.batch_size,
        dtype=cfg.dtype,
        device_name=cfg.device,
    )
    examples = task.train[:n] if n else task.train
    rows = estimate_pass_rates(
        engine,
        tok,
        examples,
        cfg.task,
        k=k,
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        progress=cfg.progress,
    )
    write_rows(rows, Path(output))
    mean = sum(r["pass_rate"] for r in rows) / len(rows)
    print(f"wrote {output}: {len(rows)} questions, mean pass rate {mean:.3f} over k={k} samples")
    return 0


def cmd_report(args: list[str]) -> int:
    from thinkrl.eval.report import build_report

    run = [a for a in args if "=" not in a]
    opts = dict(a.split("=", 1) for a in args if "=" in a)
    if len(run) != 1 or set(opts) - {"output"}:
        raise ConfigError("usage: thinkrl report RUN_DIR [output=DIR]")
    md = build_report(run[0], opts.get("output"))
    print(f"wrote {md}")
    return 0


def cmd_sandbox(args: list[str]) -> int:
    """``thinkrl sandbox check``: what the code sandbox enforces on this machine, measured from
    inside a probe run. Exit status 0 when model code runs isolated, 1 when it would be refused."""
    from thinkrl import sandbox

    if args != ["check"]:
        raise ConfigError("usage: thinkrl sandbox check")
    caps = sandbox.capabilities()
    yes = lambda b: "yes" if b else "NO"  # noqa: E731
    method = {
        "root": "namespaces as root, program under a fresh unprivileged uid",
        "userns": "namespaces inside an unprivileged user namespace",
    }.get(caps.get("method"), "none")
    rows = [
        ("isolation", method),
        (
            "mount namespace, host read-only",
            yes(caps.get("mountns")) + f" ({caps.get('readonly_mounts', 0)} mounts)",
        ),
        ("network namespace (no network)", yes(caps.get("netns"))),
        (
            "PID namespace, own /proc",
            yes(caps.get("pidns")) + ("" if caps.get("own_proc", True) else " (host /proc hidden)"),
        ),
        ("IPC and UTS namespaces", yes(caps.get("ipcns"))),
        ("program uid", str(caps.get("uid", "?"))),
        (
            "capabilities left",
            {0: "none", None: "?"}.get(caps.get("capabilities"), hex(caps.get("capabilities") or 0)),
        ),
        ("no_new_privs", yes(caps.get("no_new_privs"))),
        (
            "seccomp filter",
            f"{caps.get('seccomp_rules', 0)} rules"
            if caps.get("seccomp_mode") == 2
            else "NO (" + caps.get("seccomp_error", "not loaded") + ")",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for e in caps.get("errors", []):
        print(f"note: {e.strip()}")
    if caps["isolated"]:
        print("verdict: model-written code runs isolated")
        return 0
    print(
        "verdict: NOT isolated; the code reward refuses to run unless sandbox.allow_unconfined=true.\n"
        + sandbox.HOW_TO_ISOLATE
    )
    return 1


def cmd_serve(args: list[str]) -> int:
    from thinkrl.config import build_config
    from thinkrl.serve.server import ServeConfig, serve

    serve(build_config(*_split(args), cls=ServeConfig))
    return 0


def cmd_chat(args: list[str]) -> int:
    from thinkrl.config import build_config
    from thinkrl.serve.chat import ChatConfig, run_chat

    return run_chat(build_config(*_split(args), cls=ChatConfig))


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "sft": cmd_sft,
    "dpo": cmd_dpo,
    "rm": cmd_rm,
    "sample": cmd_sample,
    "merge": cmd_merge,
    "pipeline": cmd_pipeline,
    "difficulty": cmd_difficulty,
    "report": cmd_report,
    "push": cmd_push,
    "sandbox": cmd_sandbox,
    "serve": cmd_serve,
    "chat": cmd_chat,
}


DATA_PARALLEL = frozenset({"train", "sft", "dpo"})  # the commands that torchrun can launch on many ranks


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="thinkrl", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=sorted(COMMANDS))
    parser.add_argument("-v", "--verbose", action="store_true")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    verbose = "-v" in argv or "--verbose" in argv
    argv = [a for a in argv if a not in ("-v", "--verbose")]
    ns = parser.parse_args(argv[:1])
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 alone prints results and progress
    if not rank0:
        sys.stdout = open(os.devnull, "w")
    logging.basicConfig(
        level=logging.WARNING if not rank0 else logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "httpx", "urllib3", "huggingface_hub", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from thinkrl.models import ModelError
    from thinkrl.sandbox import SandboxUnavailable

    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and ns.command not in DATA_PARALLEL:
            raise ConfigError(
                f"thinkrl {ns.command} runs in one process; under torchrun only "
                f"{', '.join(sorted(DATA_PARALLEL))} are data-parallel (launch it without torchrun)"
            )
        return COMMANDS[ns.command](argv[1:])
    except (ConfigError, ModelError, SandboxUnavailable) as e:
        print(f"thinkrl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # thinkrl.trainer.interrupt.Interrupted says what it saved
        print(f"thinkrl: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    finally:
        if "thinkrl.distributed.torch_dist" in sys.modules:  # a torchrun run: leave the process group cleanly
            sys.modules["thinkrl.distributed.torch_dist"].close()


if __name__ == "__main__":
    sys.exit(main())
