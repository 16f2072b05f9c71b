"""Bradley-Terry reward models: a scalar head on a causal LM, trained on preference pairs.

The pairs are the rows ``thinkrl dpo`` reads (``prompt``, ``chosen``, ``rejected``). The model
is a Hugging Face sequence-classification model with one label. Its backbone starts from the
causal LM's weights. Its head ``score`` (hidden -> 1, no bias) is new, and reads the hidden
state of the *last token* of prompt + response. The loss is the Bradley-Terry negative
log-likelihood (Bradley and Terry 1952; Ouyang et al. 2022, eq. 1), optionally with a margin:

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin)

A seeded held-out share of the pairs gives the pair accuracy: the fraction scored in the right
order. Checkpoints, ``resume=true``, the guards against non-finite losses and a clean stop on
Ctrl-C are those of ``thinkrl sft`` (thinkrl/trainer/supervised.py). With ``lora.enabled=true``
the backbone trains LoRA adapters and the head trains in full beside them (peft's
``modules_to_save``); checkpoints hold the adapter with the head, which a resumed run loads
on top of the base, and ``final/`` the merged model, so the ``rm:PATH`` reward loads either
kind the same way. The output folder
(``final/``) is an ordinary ``AutoModelForSequenceClassification``
folder with its tokenizer, plus ``thinkrl_rm.json`` (the chat-template settings the prompts
were rendered with and the held-out accuracy), which the ``rm:PATH`` reward reads.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F

from thinkrl import device
from thinkrl.config import LoraConfig, validate_lora
from thinkrl.data import read_rows
from thinkrl.models import load_model
from thinkrl.rollout import autocast
from thinkrl.trainer.common import apply_lora, is_lora, make_optimizer, need
from thinkrl.trainer.dpo import Pair, encode_pairs
from thinkrl.trainer.supervised import SupervisedConfig, run_steps

log = logging.getLogger(__name__)
RM_FILE = "thinkrl_rm.json"


@dataclass
class RMConfig(SupervisedConfig):
    command: ClassVar[str] = "rm"
    data_help: ClassVar[str] = "a JSONL file of prompt/chosen/rejected rows"

    output_dir: str = "runs/rm"
    margin: float = 0.0  # Bradley-Terry with a margin: chosen must beat rejected by this much
    eval_fraction: float = 0.1  # seeded share of the pairs held out for pair accuracy
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters on the backbone; the head trains in full

    def validate(self) -> None:
        super().validate()
        validate_lora(self.lora)
        need(0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)")
        need(self.margin >= 0, "margin must be >= 0")


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) over the pairs ([B] each)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


def reward_model_from(causal_lm):
    """A one-label sequence-classification model whose backbone is ``causal_lm``'s (copied)."""
    from transformers import AutoModelForSequenceClassification

    cfg = causal_lm.config
    cfg.num_labels = 1
    cfg.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    rm = AutoModelForSequenceClassification.from_config(cfg)
    getattr(rm, rm.base_model_prefix).load_state_dict(
        getattr(causal_lm, causal_lm.base_model_prefix).state_dict()
    )
    return rm


def scores(rm, seqs: list[list[int]], pad_id: int, bf16: bool = False) -> torch.Tensor:
    """r for each token sequence: the head on the hidden state of its last token, [B]. Right
    padding and an explicit gather make a batch equal to its rows scored one by one. A LoRA
    model is called through its wrapped model, whose layers hold the adapters."""
    rm = rm.get_base_model() if is_lora(rm) else rm
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])  # [B, L]
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])  # [B, L]
    last = torch.tensor([len(s) - 1 for s in seqs])  # [B]
    dev = next(rm.score.parameters()).device
    ids, attn, last = (device.to(x, dev) for x in (ids, attn, last))
    with autocast(bf16, dev):
        hidden = getattr(rm, rm.base_model_prefix)(
            input_ids=ids, attention_mask=attn
        ).last_hidden_state  # [B, L, H]
        h = hidden[torch.arange(len(seqs), device=dev), last]  # [B, H]
        return device.to(rm.score(h).float().squeeze(-1), "cpu")  # [B], on the CPU (differentiable)


def pair_scores(rm, pairs: list[Pair], pad_id: int, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    r = scores(rm, seqs, pad_id, bf16)
    return r[: len(pairs)], r[len(pairs) :]


@torch.no_grad()
def pair_accuracy(rm, pairs: list[Pair], pad_id: int, bf16: bool, batch_size: int = 16) -> float:
    """Share of pairs whose chosen response scores above the rejected one."""
    if not pairs:
        return float("nan")
    rm.eval()
    right = 0
    for s in range(0, len(pairs), batch_size):
        c, r = pair_scores(rm, pairs[s : s + batch_size], pad_id, bf16)
        right += int((c > r).sum())
    return right / len(pairs)


def split_pairs(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = int(round(fraction * len(pairs)))
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def _setup(cfg: RMConfig, found, dev: str, bf16: bool):
    """The reward model (from the policy model, or the checkpoint being resumed), its tokenizer,
    the train and held-out pairs, and the held-out pair accuracy before training."""
    from transformers import AutoModelForSequenceClassification

    from thinkrl.trainer.checkpoint import load_adapter

    rows = read_rows(cfg.data, need=("prompt", "chosen", "rejected"))
    causal, tok = load_model(cfg.model)
    pairs = encode_pairs(rows, tok, cfg.task, cfg.max_len)
    train_pairs, eval_pairs = split_pairs(pairs, cfg.eval_fraction, cfg.seed)
    need(len(train_pairs) > 0, "no pairs left to train on after holding out eval_fraction")
    if found is None or cfg.lora.enabled:  # LoRA resumes from the base plus the saved adapter and head
        rm = reward_model_from(causal).to(dev)
        rm = apply_lora(rm, cfg.lora, task_type="SEQ_CLS", modules_to_save=["score"])
        if found is not None:
            load_adapter(rm, found[0])
    else:  # the checkpoint holds the head and the backbone as trained so far
        rm = AutoModelForSequenceClassification.from_pretrained(found[0]).to(dev)
    before = (
        pair_accuracy(rm, eval_pairs, tok.pad_token_id, bf16)
        if found is None
        else found[1]["pair_accuracy_before"]
    )
    return rm, tok, train_pairs, eval_pairs, before


def train_rm(cfg: RMConfig) -> Path:
    from thinkrl.trainer.common import seed_everything
    from thinkrl.trainer.supervised import start_weights

    out = Path(cfg.output_dir)
    found, _ = start_weights(cfg, out)  # also: a LoRA checkpoint resumes only with lora.enabled=true
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    dev = device.resolve_device(cfg.device)
    device.setup(dev)
    bf16 = device.use_bf16(cfg.dtype, dev)
    rm, tok, train_pairs, eval_pairs, before = _setup(cfg, found, dev, bf16)
    pad = tok.pad_token_id
    lengths = [len(p.prompt) + max(len(p.chosen), len(p.rejected)) for p in train_pairs]
    total = cfg.max_steps or -(-len(train_pairs) // cfg.batch_size) * cfg.epochs
    opt, sched = make_optimizer(rm, cfg.lr, cfg.weight_decay, cfg.warmup_steps, total)

    def step_loss(idx: list[int]):
        c, r = pair_scores(rm, [train_pairs[i] for i in idx], pad, bf16)  # [b], [b]
        return bradley_terry_loss(c, r, cfg.margin), {
            "train_pair_accuracy": float((c > r).float().mean()),
            "margin_mean": float((c - r).mean().detach()),
        }

    final = run_steps(
        cfg,
        rm,
        tok,
        opt,
        sched,
        lengths,
        total,
        step_loss,
        found=found,
        extra_state={"pair_accuracy_before": before},
        name="rm",
    )
    after = pair_accuracy(rm, eval_pairs, pad, bf16)
    log.info(
        "held-out pair accuracy (%d pairs): %.3f before training, %.3f after", len(eval_pairs), before, after
    )
    meta = {
        "task": asdict(cfg.task),
        "eval_pairs": len(eval_pairs),
        "train_pairs": len(train_pairs),
        "pair_accuracy_before": before,
        "pair_accuracy": after,
        "margin": cfg.margin,
        "lora": asdict(cfg.lora) if cfg.lora.enabled else None,  # final/ holds the merged weights
        "head": "score: Linear(hidden, 1, bias=False) on the last token's final hidden state",
    }
    (final / RM_FILE).write_text(json.dumps(meta, indent=2))
    return final
