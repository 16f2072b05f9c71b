"""The configuration schema: dataclasses are the schema, YAML is data.

A config is built from (1) the defaults below, (2) an optional YAML file and
(3) dotted ``key=value`` overrides from the command line, in that order. Any key
that is not in the schema is an error that lists the valid keys, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from thinkrl.errors import ConfigError  # re-exported: thinkrl.config.ConfigError

__all__ = ["ConfigError"]  # and the schema's dataclasses

# Phrases that mark a model re-examining its own reasoning (R1's "aha moment"), counted in the thinking.
REFLECTION_WORDS = ("wait", "re-check", "recheck", "let me verify", "let me check", "double-check")

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. First think about the problem step by step inside "
    "<think> </think> tags, then give only the final answer inside <answer> </answer> tags, "
    "for example: <think> reasoning here </think> <answer> 42 </answer>"
)


@dataclass
class TaskConfig:
    name: str = "chain_sum"  # a reasoning-gym dataset name, or a path to a .jsonl file
    # The reasoning-gym dataset's own config. The default recipe: sums and differences of
    # two numbers of 1-2 digits, where SmolLM2-135M starts near 16% (greedy).
    params: dict = field(
        default_factory=lambda: {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
    )
    train_size: int = 2000
    eval_size: int = 200
    seed: int = 0
    eval_seed: int = 1_000_003  # a seed range disjoint from training; duplicates are removed too
    eval_path: str | None = None  # held-out JSONL for file tasks (else a split of the file)
    template: str = "chat"  # chat | r1_zero | plain
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT  # used by the chat template
    prefill: str = "<think>"  # text the assistant turn starts with (chat and plain templates)
    # Demonstration turns shown before the question (chat template only), each a mapping
    # {question: ..., response: ...}. Small chat models copy a format far more reliably
    # from one worked exchange than from an instruction alone.
    fewshot: list = field(
        default_factory=lambda: [
            {
                "question": "What is 7 + 8?",
                "response": "<think> 7 plus 8 is 15. </think> <answer> 15 </answer>",
            }
        ]
    )
    # name=mix: a weighted mixture of reasoning-gym datasets, each {name, params, weight}.
    mixture: list = field(default_factory=list)
    # reasoning-gym curriculum levels to draw from in equal shares, e.g. [0, 1, 2]; each
    # example keeps its level (meta "level"), which curriculum sampling orders by.
    levels: list = field(default_factory=list)
    # Columns of a data file that hold the question, answer and (optionally) pass rate,
    # e.g. {question: problem, answer: solution}; unnamed ones keep their own name.
    fields: dict = field(default_factory=dict)
    # Qwen3's thinking modes (thinkrl/tasks/thinking.py): on | off | switch. The question gets the
    # soft switch " /think" (on) or " /no_think" (off), and the chat template its enable_thinking
    # flag where it has one; switch mixes the two per example, think_share of them on, and
    # evaluates every held-out question in both modes. None: the question as it is.
    thinking: str | bool | None = None  # YAML reads a bare on / off as true / false: the same modes
    think_share: float = 0.5
    max_prompt_tokens: int = 0  # rows whose rendered prompt is longer are skipped and counted (0: no limit)
    pass_rates: str | None = None  # JSONL written by `thinkrl difficulty`, joined on the question text
    min_pass_rate: float = 0.0  # keep training rows with min_pass_rate <= pass rate <= max_pass_rate
    max_pass_rate: float = 1.0


@dataclass
class SamplingConfig:
    """Which training prompts a step sees (Kimi k1.5 section 2.3.4; DAPO section 3.2)."""

    order: str = "shuffle"  # shuffle | curriculum (easy to hard) | prioritized (by 1 - success rate)
    priority_floor: float = 0.05  # weight of a prompt that is always solved, so it is still revisited
    priority_ema: float = 0.5  # weight of the newest group in a prompt's tracked success rate
    priority_prior: float = 0.5  # success rate assumed for a prompt not yet seen
    dynamic: bool = False  # DAPO dynamic sampling: drop groups whose rewards are all equal, refill
    max_rounds: int = 3  # extra generation rounds a step may spend refilling dropped groups


@dataclass
class RolloutConfig:
    backend: str = "fast"  # fast (thinkrl's engine, Llama-family models) | hf (transformers generate)
    # 4 x 8 = 32 completions a step: the default run learns as much as with 8 prompts (+17
    # points in 40 steps, docs/speed.md) at about half the cost, which an fp32-only CPU needs
    prompts_per_step: int = 4
    group_size: int = 8  # G samples per prompt
    max_new_tokens: int = 64
    temperature: float = 0.8  # at 1.0 a 135M model loses the format in most samples
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 64  # sequences generated at once
    # distributed.backend=ray only (docs/distributed-ray.md):
    # How many learner updates the rollout workers may run ahead: batches t+1..t+k are
    # generated while the learner trains on batch t. 0: on-policy (equals a synchronous run).
    max_staleness: int = 0
    # Kimi k1.5 partial rollouts: at most this many new tokens per unfinished sequence per
    # iteration; unfinished ones carry over and continue under newer weights. 0: off.
    partial_tokens: int = 0
    partial_max_iters: int = 4  # iterations a sequence may span; in its last one it runs to the end
    server_url: str | None = None  # backend=openai: base URL of an OpenAI-compatible server (…/v1)
    server_model: str | None = None  # backend=openai: the model name to ask for; None: the server's first


@dataclass
class AlgoConfig:
    # grpo | dr_grpo | rloo | reinforce | reinforce_pp | reinforce_pp_baseline | gae (PPO, with a critic)
    advantage: str = "grpo"
    loss: str = "ppo_clip"  # ppo_clip | dual_clip | pg | gspo | kimi
    clip_eps: float = 0.2
    clip_eps_high: float | None = None  # DAPO clip-higher; None means clip_eps
    clip_c: float = 3.0  # dual_clip: bound on the loss of negative-advantage tokens (c > 1)
    tau: float = 0.1  # kimi: relative-entropy regularisation strength
    num_iterations: int = 1  # optimisation passes over one batch of rollouts
    # Optimizer steps per pass: the batch's groups are split into this many mini-batches
    # (verl's ppo_mini_batch_size, TRL's steps_per_generation). From the second one on the
    # policy has moved, so the ratio differs from 1 and clipping acts.
    mini_batches: int = 1
    # Truncated importance sampling (Yao et al. 2025): weight each token's policy loss by
    # min(pi_old / pi_behaviour, tis_cap), pi_behaviour being the rollout engine's own
    # log-prob of the sampled token (bf16, other kernels). None: no correction.
    tis_cap: float | None = None
    kl_coef: float = 0.0  # beta; 0 loads no reference model
    kl_estimator: str = "k3"  # k1 | k2 | k3
    kl_in: str | None = None  # loss | reward; None: the estimator's default (reward for gae and reinforce*)
    loss_agg: str | None = None  # None: the loss's or the advantage's own default (see algorithms)
    std_eps: float = 1e-4
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * entropy
    gamma: float = 1.0  # discount of token rewards (reinforce*, gae)
    lam: float = 1.0  # GAE lambda
    baseline_decay: float | None = None  # reinforce: moving-average reward baseline; None: no baseline
    critic_model: str | None = None  # gae: the critic's backbone; None: a copy of `model`
    critic_lr: float = 1e-5  # gae: the critic's AdamW learning rate (constant)
    vf_clip: float | None = 0.2  # gae: PPO value clip; None: unclipped


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021, "LoRA") through ``peft``: the base weights stay
    frozen and each target linear learns W + (alpha / r) * B A, with B zero at the start.
    In RL the frozen base is also the KL reference, read with the adapter switched off, so
    ``algo.kl_coef > 0`` costs no second copy of the weights."""

    enabled: bool = False
    r: int = 8  # rank of B A
    alpha: int = 16  # scale alpha / r on B A
    dropout: float = 0.0  # dropout on the adapter's input (training mode only)
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.99)
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine | linear
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    # An update whose reward, loss or gradient norm is NaN or infinite is skipped (weights
    # untouched, counted in metrics.jsonl); this many skips in a row stop the run, with the
    # last good checkpoint kept (thinkrl/trainer/guards.py).
    max_bad_steps: int = 3
    micro_batch_size: int = 32  # rows per forward/backward (whole groups); the loss does not depend on it
    # Activation (gradient) checkpointing: keep only each decoder layer's input during the
    # forward pass and recompute the rest in the backward pass, trading ~1/3 more compute for
    # activation memory that no longer grows with layers x tokens (long sequences). The
    # grouped prompt-once forward needs a KV cache, which checkpointed layers refuse, so
    # training micro-batches then run every row in full.
    gradient_checkpointing: bool = False


@dataclass
class EvalConfig:
    n: int = 200  # held-out questions
    before: bool = True  # evaluate the initial model
    after: bool = True  # evaluate the final model
    every: int = 0  # also evaluate every N steps (0: never)
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    batch_size: int = 64
    samples: int = 1  # completions per question: pass@1 is their mean, plus pass@k and maj@k for k = samples
    temperature: float | None = None  # None: greedy for samples=1, else rollout.temperature
    reflection_words: list = field(default_factory=lambda: list(REFLECTION_WORDS))
    # s1's "Wait" extension (thinkrl/rollout/thinking.py): a response may not close its thinking
    # before this many thinking tokens; 0: no minimum.
    min_thinking: int = 0


@dataclass
class LogConfig:
    # Where each step's metrics go besides metrics.jsonl (always written): any of tensorboard,
    # wandb, trackio, each an optional extra (thinkrl/trainer/tracking.py).
    backends: list = field(default_factory=lambda: ["jsonl"])
    project: str = "thinkrl"  # the wandb / trackio project


@dataclass
class MonitorConfig:
    # Over-optimisation monitor (thinkrl/trainer/monitor.py): the gold reward (a verifiable
    # check, e.g. accuracy with weight 0) and the proxy (e.g. rm) by reward name; the run stops
    # when, over the last `window` steps, gold falls while the proxy rises. window 0: off.
    gold: str | None = None
    proxy: str | None = None
    window: int = 0


@dataclass
class EnvConfig:
    """The environment episodes run in (thinkrl/envs, docs/tools.md)."""

    name: str = (
        "single_turn"  # single_turn (one turn, the plain rollout) | python (a Python tool in the sandbox)
    )
    max_tool_calls: int = 4  # per episode; a call past it ends the episode (reason tool_budget_exceeded)
    max_turns: int = 8  # policy turns per episode, at most
    call_timeout_s: float = 5.0  # wall clock (and CPU seconds, rounded up) per tool call
    call_memory_mb: int = 256  # address space per tool call
    max_output_chars: int = 512  # a call's output is cut to this many characters before the model sees it
    # How a turn continues after an observation: cache (append it to the episode's KV cache,
    # rollout.backend=fast), reprefill (run the whole history again), auto (cache where possible)
    decoder: str = "auto"


@dataclass
class SandboxConfig:
    # Where no isolation can be built (no user namespaces, root without CAP_SYS_ADMIN in a
    # locked-down container), model-written code does not run unless this is true; it then runs
    # with rlimits only, never as root, and the run logs that it does (docs/rewards.md).
    allow_unconfined: bool = False


@dataclass
class DistributedConfig:
    """Data parallelism under torchrun (thinkrl/distributed/torch_dist.py, docs/distributed.md)
    and the trainer/rollout split on Ray (thinkrl/distributed/ray_*.py, docs/distributed-ray.md)."""

    strategy: str = "ddp"  # ddp: replicated weights, summed gradients | fsdp: FSDP2-sharded policy (train)
    # Seed each group's sampling by (seed, step, group index in the global batch), one engine
    # call per group: rollouts then do not depend on the world size (slower: smaller batches).
    # False: one batched call per step, seeded per step and rank when there are several ranks.
    seed_by_group: bool = False
    backend: str | None = None  # None: one process, as always | ray: rollout workers + a learner on Ray
    rollout_workers: int = 1  # Ray actors, each holding an engine and the rewards


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local cluster; "auto" or "ray://host:port": join one
    num_cpus: int | None = None  # CPUs of a local cluster (None: Ray's own count)
    cpus_per_worker: float = 1.0  # Ray CPUs each rollout worker reserves
    gpus_per_worker: float = 0.0  # Ray GPUs each rollout worker reserves (vllm: 1 in split placement)
    # split: workers on their own devices | colocated: a vllm engine sleeps while the learner trains
    placement: str = "split"
    max_restarts: int = 1  # times Ray restarts a dead rollout worker before the run drops it
    sync_timeout_s: float = 120.0  # a worker must confirm new weights within this, or fail loudly
    rollout_timeout_s: float = 1800.0  # one rollout iteration on one worker must return within this
    # how new weights reach the workers: object_store (Ray's; dead workers dropped or restarted) |
    # collective (a broadcast in a process group of their own: gloo on CPU, NCCL on GPU)
    weight_sync: str = "object_store"


@dataclass
class Config:
    model: str = "smollm2-135m"
    output_dir: str = "runs/default"
    max_steps: int = 40
    max_minutes: float = (
        0.0  # stop training after this much wall time (0: no limit); final/ and eval still run
    )
    seed: int = 0
    dtype: str = (
        "auto"  # auto | bf16 | fp32 (auto: bf16 autocast where the CPU (natively) or the GPU runs it)
    )
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto: the first CUDA GPU if any (thinkrl/device.py)
    threads: int = 0  # torch threads; 0 = all cores
    resume: bool = False
    save_every: int = 10
    keep_checkpoints: int = 2
    log_samples: int = 4  # completions written to samples.jsonl per step
    plot: bool = True
    progress: bool = True
    # Merged key by key: ``rewards.format=0.5`` keeps the other rewards (weight 0 turns one off).
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1}, metadata={"merge": True})
    # Options of individual rewards, e.g. {code: {mode: fraction, timeout: 5}, overlong: {buffer: 32}}
    # (each reward's keyword-only parameters; see docs/rewards.md).
    reward_args: dict = field(default_factory=dict, metadata={"merge": True})
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    # The user's own components: .py files or module names imported before the config is
    # checked, so what they register can be named here (thinkrl/plugins.py, docs/extending.md).
    plugins: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------
# Building a config from dicts, YAML and overrides


def _merged_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("merge")}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against the annotated type, with the few safe coercions YAML needs."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if typ is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if typ is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if typ is tuple or origin is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return value


def _merge(obj: Any, data: dict, prefix: str = "") -> None:
    """Write ``data`` into the dataclass ``obj`` in place, validating every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    types_ = _field_types(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types_:
            valid = ", ".join(prefix + k for k in types_)
            raise ConfigError(f"unknown config key '{full}'. Valid keys here: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, prefix=f"{full}.")
        elif key in _merged_fields(type(obj)) and isinstance(value, dict):
            setattr(obj, key, {**current, **_coerce(value, types_[key], full)})
        else:
            setattr(obj, key, _coerce(value, types_[key], full))


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{p}' is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """Turn ``["a.b=1", "model=x"]`` into a nested dict; values are parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(out, key, value)
    return out


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "params":
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def _reset_params_with_name(layer: dict) -> dict:
    """A layer that picks another task without giving its params starts from no params:
    the previous task's knobs mean nothing to a different dataset."""
    task = layer.get("task")
    if isinstance(task, dict) and "name" in task and "params" not in task:
        task["params"] = {}
    return layer


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys")
    return data


def build_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
    cls: type = None,
):
    """Defaults <- ``base`` <- YAML file <- overrides, then validation.

    ``cls`` is the schema (default :class:`Config`); other commands pass their own
    dataclass, which may define ``validate()``.
    """
    cls = cls or Config
    data: dict = {}
    for layer in (base or {}, load_yaml(path) if path else {}, parse_overrides(overrides or [])):
        _deep_update(data, _reset_params_with_name(layer))
    cfg = cls()
    _merge(cfg, data)
    if getattr(cfg, "plugins", None):
        from thinkrl.plugins import load_plugins

        load_plugins(cfg.plugins)
    if cls is Config:
        validate(cfg)
    elif hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


DTYPES = ("auto", "bf16", "fp32")


def check_dtype(dtype: str) -> None:
    """``dtype`` (of any command's config) is one of :data:`DTYPES`, or one ConfigError."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' unknown; choose from: {', '.join(DTYPES)}")


def validate(cfg: Config) -> None:
    from thinkrl.algorithms import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
    from thinkrl.tasks.templates import TEMPLATES

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.max_steps >= 1, "max_steps must be >= 1")
    _validate_rollout(cfg, need)
    need(
        cfg.distributed.strategy in ("ddp", "fsdp"),
        f"distributed.strategy '{cfg.distributed.strategy}' unknown; choose from: ddp, fsdp",
    )
    _validate_distributed(cfg, need)
    need(cfg.algo.num_iterations >= 1, "algo.num_iterations must be >= 1")
    need(cfg.algo.kl_coef >= 0, "algo.kl_coef must be >= 0")
    need(cfg.algo.clip_eps > 0, "algo.clip_eps must be > 0")
    _validate_algo(cfg, need)
    _validate_optim(cfg, need)
    check_dtype(cfg.dtype)
    need(
        cfg.task.template in TEMPLATES,
        f"task.template '{cfg.task.template}' unknown; choose from: {', '.join(TEMPLATES.names())}",
    )
    for reg, key in (
        (ADVANTAGES, cfg.algo.advantage),
        (POLICY_LOSSES, cfg.algo.loss),
        (KL_ESTIMATORS, cfg.algo.kl_estimator),
    ):
        reg.check(key)
    if cfg.algo.loss_agg is not None:
        LOSS_AGGREGATIONS.check(cfg.algo.loss_agg)
    _validate_data(cfg, need)
    _validate_env(cfg, need)
    validate_lora(cfg.lora)
    for i, shot in enumerate(cfg.task.fewshot):
        need(
            isinstance(shot, dict) and set(shot) == {"question", "response"},
            f"task.fewshot[{i}] must be a mapping with exactly the keys 'question' and 'response'",
        )
    _validate_rewards(cfg, need)


def _validate_rollout(cfg: Config, need) -> None:
    """Sampling settings and the rollout backend."""
    from thinkrl.rollout import ENGINES  # the registered backends

    need(cfg.rollout.group_size >= 2, "rollout.group_size must be >= 2 (GRPO compares samples in a group)")
    need(cfg.rollout.prompts_per_step >= 1, "rollout.prompts_per_step must be >= 1")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens must be >= 1")
    need(cfg.rollout.temperature > 0, "rollout.temperature must be > 0 for RL sampling")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p must be in (0, 1]")
    worker_only = ("vllm", "openai")  # engines of Ray rollout workers (thinkrl/distributed/ray_*.py)
    need(
        cfg.rollout.backend in ENGINES or cfg.rollout.backend in worker_only,
        f"rollout.backend '{cfg.rollout.backend}' unknown; choose from: {', '.join(ENGINES.names() + list(worker_only))}",
    )


def _validate_optim(cfg: Config, need) -> None:
    """Optimizer, schedule and checkpoint settings."""
    from thinkrl.trainer.common import SCHEDULES

    need(cfg.optim.lr > 0, "optim.lr must be > 0")
    need(cfg.optim.micro_batch_size >= 1, "optim.micro_batch_size must be >= 1")
    need(
        cfg.optim.max_bad_steps >= 1,
        "optim.max_bad_steps must be >= 1 (skipped updates in a row that stop a run)",
    )
    need(
        cfg.save_every >= 0 and cfg.keep_checkpoints >= 0,
        "save_every and keep_checkpoints must be >= 0 (0: no step checkpoints, keep all of them)",
    )
    need(
        cfg.optim.schedule in SCHEDULES,
        f"optim.schedule '{cfg.optim.schedule}' unknown; choose from: {', '.join(SCHEDULES.names())}",
    )


def _validate_env(cfg: Config, need) -> None:
    """The environment, and what a multi-turn one rules out."""
    from thinkrl.envs import validate_env

    validate_env(cfg.env)
    need(
        cfg.env.name == "single_turn" or cfg.algo.advantage != "gae",
        f"env.name={cfg.env.name} with algo.advantage=gae: the critic would be trained on tool-output "
        "tokens; multi-turn episodes support the critic-free estimators (grpo, dr_grpo, rloo, reinforce*)",
    )


def _validate_rewards(cfg: Config, need) -> None:
    """The rewards, their weights and their options."""
    from thinkrl.rewards import check_options, resolve

    need(len(cfg.rewards) > 0, "rewards: at least one reward is needed")
    for name, w in cfg.rewards.items():
        resolve(name)
        need(
            isinstance(w, (int, float)) and not isinstance(w, bool),
            f"rewards.{name}: weight must be a number",
        )
    for name, opts in cfg.reward_args.items():
        need(
            name in cfg.rewards, f"reward_args.{name}: '{name}' is not in rewards ({', '.join(cfg.rewards)})"
        )
        need(isinstance(opts, dict), f"reward_args.{name}: expected a mapping of options, got {opts!r}")
        check_options(name, resolve(name), opts)


def _validate_distributed(cfg: Config, need) -> None:
    d, r, ro = cfg.distributed, cfg.ray, cfg.rollout
    need(
        d.backend in (None, "ray"),
        f"distributed.backend '{d.backend}' unknown; choose from: ray (or leave it unset)",
    )
    need(d.rollout_workers >= 1, "distributed.rollout_workers must be >= 1")
    need(ro.max_staleness >= 0, "rollout.max_staleness must be >= 0 (0: on-policy)")
    need(ro.partial_tokens >= 0, "rollout.partial_tokens must be >= 0 (0: no partial rollouts)")
    need(ro.partial_max_iters >= 1, "rollout.partial_max_iters must be >= 1")
    need(
        r.sync_timeout_s > 0 and r.rollout_timeout_s > 0,
        "ray.sync_timeout_s and ray.rollout_timeout_s must be > 0",
    )
    need(r.max_restarts >= 0, "ray.max_restarts must be >= 0")
    need(
        r.cpus_per_worker > 0 and r.gpus_per_worker >= 0,
        "ray.cpus_per_worker must be > 0, ray.gpus_per_worker >= 0",
    )
    need(
        r.weight_sync in ("object_store", "collective"),
        f"ray.weight_sync '{r.weight_sync}' unknown; choose from: object_store, collective",
    )
    need(
        r.placement in ("split", "colocated"),
        f"ray.placement '{r.placement}' unknown; choose from: split, colocated",
    )
    if d.backend == "ray":
        import os

        need(
            int(os.environ.get("WORLD_SIZE", "1")) == 1,
            "distributed.backend=ray runs its own workers: start it with thinkrl train, not under torchrun",
        )
    if d.backend != "ray":
        for key, val, off in (
            ("rollout.max_staleness", ro.max_staleness, 0),
            ("rollout.partial_tokens", ro.partial_tokens, 0),
            ("distributed.rollout_workers", d.rollout_workers, 1),
        ):
            need(val == off, f"{key}={val} needs distributed.backend=ray")
        need(
            ro.backend in ("fast", "hf"),
            f"rollout.backend={ro.backend} runs in rollout workers: add distributed.backend=ray",
        )
        return
    if cfg.env.name != "single_turn":  # multi-turn episodes run whole, on the in-process engines
        need(
            ro.backend in ("fast", "hf") and ro.partial_tokens == 0,
            f"env.name={cfg.env.name} (multi-turn episodes) on Ray needs rollout.backend=fast or hf "
            "and rollout.partial_tokens=0: an episode runs to its end within one rollout iteration",
        )
    need(
        ro.backend != "openai" or bool(ro.server_url),
        "rollout.backend=openai needs rollout.server_url (e.g. http://127.0.0.1:8000/v1)",
    )


def _validate_data(cfg: Config, need) -> None:
    t, s = cfg.task, cfg.sampling
    need(
        t.thinking is None
        or isinstance(t.thinking, bool)
        or t.thinking in ("on", "off", "switch", "think", "no_think"),
        f"task.thinking '{t.thinking}' unknown; choose from: on, off, switch",
    )
    need(0.0 <= t.think_share <= 1.0, "task.think_share must be between 0 and 1")
    need(t.max_prompt_tokens >= 0, "task.max_prompt_tokens must be >= 0 (0: no limit)")
    need(
        0.0 <= t.min_pass_rate <= t.max_pass_rate <= 1.0,
        "task.min_pass_rate and task.max_pass_rate must satisfy 0 <= min <= max <= 1",
    )
    need(
        set(t.fields) <= {"question", "answer", "pass_rate"},
        f"task.fields: unknown key(s) {sorted(set(t.fields) - {'question', 'answer', 'pass_rate'})}; "
        "valid keys: question, answer, pass_rate",
    )
    need(
        t.name != "mix" or len(t.mixture) > 0,
        "task.name=mix needs task.mixture: a list of {name, params, weight}",
    )
    need(not (t.mixture and t.levels), "task.levels and task.mixture cannot be combined")
    for i, item in enumerate(t.mixture):
        need(
            isinstance(item, dict) and "name" in item and set(item) <= {"name", "params", "weight"},
            f"task.mixture[{i}] must be a mapping with 'name' and optionally 'params' and 'weight'",
        )
        w = item.get("weight", 1.0)
        need(
            isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0,
            f"task.mixture[{i}].weight must be > 0",
        )
    need(
        all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in t.levels),
        "task.levels must be a list of integers >= 0",
    )
    from thinkrl.sampling.samplers import SAMPLERS

    need(
        s.order in SAMPLERS, f"sampling.order '{s.order}' unknown; choose from: {', '.join(SAMPLERS.names())}"
    )
    need(0.0 < s.priority_floor <= 1.0, "sampling.priority_floor must be in (0, 1]")
    need(0.0 < s.priority_ema <= 1.0, "sampling.priority_ema must be in (0, 1]")
    need(0.0 <= s.priority_prior <= 1.0, "sampling.priority_prior must be in [0, 1]")
    need(s.max_rounds >= 0, "sampling.max_rounds must be >= 0")
    need(cfg.max_minutes >= 0, "max_minutes must be >= 0 (0: no limit)")
    need(cfg.eval.samples >= 1, "eval.samples must be >= 1")
    need(
        isinstance(cfg.eval.min_thinking, int) and cfg.eval.min_thinking >= 0,
        "eval.min_thinking must be a whole number of tokens >= 0 (0: no minimum)",
    )
    need(
        cfg.eval.samples == 1 or cfg.eval.temperature is None or cfg.eval.temperature > 0,
        "eval.samples > 1 needs eval.temperature > 0 (greedy samples would all be the same)",
    )


def validate_lora(lora: LoraConfig) -> None:
    """Checks shared by every trainer with a ``lora`` section (RL, SFT)."""
    if not lora.enabled:
        return
    if lora.r < 1 or lora.alpha <= 0:
        raise ConfigError("lora.r must be >= 1 and lora.alpha > 0")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError("lora.dropout must be in [0, 1)")
    if not lora.target_modules or not all(isinstance(t, str) for t in lora.target_modules):
        raise ConfigError(
            "lora.target_modules must be a non-empty list of module names, e.g. [q_proj, v_proj]"
        )


def _validate_algo(cfg: Config, need) -> None:
    from thinkrl.algorithms import ADVANTAGES, kl_in_for, takes_token_rewards

    a = cfg.algo
    need(a.clip_eps_high is None or a.clip_eps_high > 0, "algo.clip_eps_high must be > 0")
    need(a.mini_batches >= 1, "algo.mini_batches must be >= 1")
    need(
        a.mini_batches <= cfg.rollout.prompts_per_step,
        f"algo.mini_batches={a.mini_batches} is more than the {cfg.rollout.prompts_per_step} groups of a step "
        "(rollout.prompts_per_step): a mini-batch holds whole groups",
    )
    need(a.tis_cap is None or a.tis_cap > 0, "algo.tis_cap must be > 0 (or null for no correction)")
    from thinkrl.trainer.tracking import check_backends

    check_backends(cfg.log.backends)
    mon = cfg.monitor
    if mon.window:
        need(mon.window >= 2, "monitor.window must be >= 2 (or 0 for no monitor)")
        for role in ("gold", "proxy"):
            name = getattr(mon, role)
            need(
                bool(name) and name in cfg.rewards,
                f"monitor.{role}={name!r} must name one of the rewards in use ({', '.join(cfg.rewards)}); "
                "a gold reward only logged takes weight 0, e.g. rewards.accuracy=0",
            )
    need(a.clip_c > 1, "algo.clip_c must be > 1 (dual clip bounds the loss at -clip_c * A)")
    need(a.tau > 0, "algo.tau must be > 0")
    need(a.entropy_coef >= 0, "algo.entropy_coef must be >= 0")
    need(0 <= a.gamma <= 1 and 0 <= a.lam <= 1, "algo.gamma and algo.lam must be in [0, 1]")
    need(a.baseline_decay is None or 0 <= a.baseline_decay < 1, "algo.baseline_decay must be in [0, 1)")
    need(a.critic_lr > 0, "algo.critic_lr must be > 0")
    need(a.vf_clip is None or a.vf_clip > 0, "algo.vf_clip must be > 0 (or null for no clipping)")
    need(a.kl_in in (None, "loss", "reward"), f"algo.kl_in '{a.kl_in}' unknown; choose from: loss, reward")
    if a.kl_coef > 0 and kl_in_for(a.advantage, a.kl_in) == "reward":
        need(
            takes_token_rewards(a.advantage),
            f"algo.kl_in=reward needs an estimator with token rewards ({', '.join(ADVANTAGES.names(kl_in='reward'))}); "
            f"'{a.advantage}' uses one reward per completion: set algo.kl_in=loss",
        )


def save_config(cfg: Config, path: str | Path) -> None:
    d = cfg.to_dict()
    d["optim"]["betas"] = list(d["optim"]["betas"])
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))
