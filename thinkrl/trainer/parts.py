"""Setup of an RL run: everything a step needs, built once (:class:`Parts`), and the checkpointer
that owns its trainer state.

The policy, its tokenizer and the KL reference (:class:`Reference`), the task, the rewards, the
rollout engine, the optimizer and its schedule, the prompt sampler, the PPO critic and the
REINFORCE baseline. Shared by the single-process loop (thinkrl/trainer/rl.py) and the Ray
driver (thinkrl/distributed/ray_driver.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkrl import device, sandbox
from thinkrl.algorithms import MovingAverage, needs_values
from thinkrl.config import Config, ConfigError
from thinkrl.device import use_bf16
from thinkrl.distributed import torch_dist as dist
from thinkrl.envs import build_env
from thinkrl.models import load_model
from thinkrl.rewards import RewardModel
from thinkrl.rewards.code import runs_code
from thinkrl.rollout import build_engine, build_scorer
from thinkrl.sampling import build_sampler
from thinkrl.tasks import build_task
from thinkrl.tasks.templates import drop_long_prompts
from thinkrl.trainer import checkpoint as ckpt
from thinkrl.trainer.batch import fill_rows, logps_of
from thinkrl.trainer.common import adamw, apply_lora, enable_gradient_checkpointing, is_lora, lr_schedule
from thinkrl.trainer.critic import Critic
from thinkrl.trainer.guards import BadStepGuard

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything a step needs, built once."""

    cfg: Config
    model: object
    ref: Reference | None  # pi_ref of the KL term; None when algo.kl_coef = 0
    tok: object
    task: object
    rewards: RewardModel
    engine: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    bf16: bool
    sampler: object = None  # thinkrl.sampling: which prompts each step draws
    critic: Critic | None = None  # gae only
    baseline: MovingAverage | None = None  # reinforce's moving-average reward baseline, when configured
    dev: str = (
        "cpu"  # where the models compute (thinkrl/device.py); the step's [N, T] tensors stay on the CPU
    )
    env: object = None  # thinkrl.envs: a multi-turn environment, or None for single-turn episodes


class Reference:
    """The reference policy pi_ref of the KL penalty: the initial weights, frozen.

    Without LoRA that is a second model, loaded from ``cfg.model``. With LoRA the base
    weights never train, so pi_ref is the policy itself with its adapter switched off
    (``peft``'s ``disable_adapter``): no second copy of the weights in memory, and the
    same log-probs bit for bit as a freshly loaded base model.
    """

    def __init__(self, model=None, adapter_off: bool = False, scorer=None):
        self.model, self.adapter_off, self.scorer = model, adapter_off, scorer

    @classmethod
    def for_policy(cls, policy, tok, cfg: Config, bf16: bool, dev: str = "cpu") -> Reference:
        if is_lora(policy):
            return cls(policy, adapter_off=True)
        ref, _ = load_model(cfg.model)
        # The reference never changes: where the backend can score, keep only its copy of the
        # weights (the fast engine's fused bf16 one: no autograd, each prompt run once per group).
        scorer = build_scorer(cfg.rollout.backend, ref, tok, bf16=bf16, device=dev)
        if scorer is not None:
            return cls(scorer=scorer)
        return cls(ref.to(dev).eval().requires_grad_(False))

    def logps(self, mbs, N: int, T: int, *, temperature: float, bf16: bool) -> torch.Tensor:
        """log pi_ref of every row in ``mbs``: [N, T], without gradients."""
        if self.scorer is not None:
            return fill_rows(mbs, N, T, lambda mb: self.scorer.score(mb, temperature))
        with self.model.disable_adapter() if self.adapter_off else contextlib.nullcontext():
            return logps_of(self.model, mbs, N, T, temperature=temperature, bf16=bf16)


def lr_lambda(cfg: Config, total: int):
    o = cfg.optim
    return lr_schedule(o.warmup_steps, total, o.schedule, o.min_lr_ratio)


def build_parts(cfg: Config, resume_from: Path | None = None) -> Parts:
    """Build the policy, reference, engine, optimizer and the rest; ``resume_from`` is a
    step checkpoint whose weights the policy starts from (its trainer state is loaded by
    the caller)."""
    dev = device.resolve_device(cfg.device)
    device.setup(dev)  # the CPU performance policy, on the CPU only
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    bf16 = use_bf16(cfg.dtype, dev)
    log.info(
        "%s; this run (dtype=%s) computes in %s", device.describe(dev), cfg.dtype, "bf16" if bf16 else "fp32"
    )
    task = build_task(cfg.task)
    sandbox.configure(cfg.sandbox.allow_unconfined)
    env = build_env(cfg.env)
    if runs_code(cfg.rewards, task.train + task.eval) or getattr(env, "runs_code", False):
        sandbox.require_isolation()  # refuse now, not at the first reward, where isolation is impossible
    with dist.main_first():  # rank 0 builds a built-in model's cache folder, the others then load it
        model, tok = load_policy(cfg, resume_from, dev)
    dist.broadcast_parameters(model)  # equal replicas from the start, whatever the loading did
    dist.shard_policy(model)  # distributed.strategy=fsdp: FSDP2 shards it in place, before the optimizer
    drop_long_prompts(task, tok, cfg.task)
    ref = Reference.for_policy(model, tok, cfg, bf16, dev) if cfg.algo.kl_coef > 0 else None  # beta = 0: none
    engine = build_engine(
        cfg.rollout.backend,
        dist.full_model(model, refresh=False),
        tok,
        batch_size=cfg.rollout.batch_size,
        bf16=bf16,
        device=dev,
    )
    log.info("rollout engine: %s", engine.describe())
    trainable = [q for q in model.parameters() if q.requires_grad]  # with LoRA: the adapters only
    opt = adamw(trainable, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    total = cfg.max_steps * cfg.algo.num_iterations * cfg.algo.mini_batches  # optimizer steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    critic = Critic.from_config(cfg, bf16, dev) if needs_values(cfg.algo.advantage) else None
    baseline = MovingAverage(cfg.algo.baseline_decay) if cfg.algo.baseline_decay is not None else None
    return Parts(
        cfg,
        model,
        ref,
        tok,
        task,
        RewardModel(cfg.rewards, cfg.reward_args),
        engine,
        opt,
        sched,
        bf16,
        sampler=build_sampler(task, cfg),
        critic=critic,
        baseline=baseline,
        dev=dev,
        env=env if env.multi_turn else None,
    )


def load_policy(cfg: Config, resume_from: Path | None = None, dev: str = "cpu"):
    """The policy to train and its tokenizer. Full fine-tuning starts from ``resume_from``'s
    weights when resuming. LoRA always starts from ``cfg.model`` (the frozen base, which is
    also the KL reference) and, when resuming, loads the adapter saved in the checkpoint."""
    lora = cfg.lora.enabled
    if resume_from is not None and lora != ckpt.has_adapter(resume_from):
        raise ConfigError(
            f"{resume_from} was trained {'without' if lora else 'with'} LoRA: resume it with "
            f"lora.enabled={'false' if lora else 'true'} (and the same lora.* settings)"
        )
    model, tok = load_model(str(resume_from) if resume_from is not None and not lora else cfg.model)
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False  # training forward passes keep no KV cache
    model.to(dev).set_attn_implementation(device.train_attention(dev))  # eager on the CPU, SDPA on CUDA
    if cfg.optim.gradient_checkpointing:
        enable_gradient_checkpointing(model)  # before peft wraps the model
    model = apply_lora(model, cfg.lora)
    if lora and resume_from is not None:
        ckpt.load_adapter(model, resume_from)
    return model, tok


def checkpointer(p: Parts, guard: BadStepGuard, out: Path) -> ckpt.Checkpointer:
    """The checkpointer of an RL run: the policy's weights and every part with a state (the
    critic beside them, in ``<run>/critic/``)."""
    components = {
        "optimizer": p.optimizer,
        "scheduler": p.scheduler,
        "task": p.task,
        "sampler": p.sampler,  # optional: checkpoints before samplers have none
        "baseline": p.baseline,
        "guard": guard,
    }
    return ckpt.Checkpointer(
        out,
        p.model,
        p.tok,
        components,
        required=("optimizer", "scheduler", "task"),
        sidecars=(p.critic,) if p.critic is not None else (),
        keep=p.cfg.keep_checkpoints,
    )
