"""The fast engine on Qwen2 and Qwen3 layouts against HF ``generate`` and the training forward,
and the fall-back to the hf engine for models it does not implement."""

import copy
import logging

import pytest
import torch

from thinkrl.config import ConfigError
from thinkrl.models import build_tiny_model, build_tiny_tokenizer, load_model
from thinkrl.rollout import MIN_SHARED_PREFIX, HFEngine, SamplingParams, build_engine, shared_prefix_len
from thinkrl.rollout.fast import FastEngine, unsupported
from thinkrl.trainer.batch import make_grouped_micro_batch, make_micro_batch, token_logps

QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Tell me a story about a cat"]  # three lengths
SYSTEM = "You are a helpful assistant. Think step by step."  # a shared prefix of > 16 tokens


@pytest.fixture(scope="session", params=["qwen2", "qwen3"])
def qwen(request, tmp_path_factory, shake):
    """A tiny random Qwen2 or Qwen3 model with its weights shaken (so greedy text is not one
    repeated token, and the q/k/v biases and q/k norms are far from their initial 0 and 1)."""
    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    build_tiny_model(path, arch)
    model, tok = load_model(str(path))
    return arch, shake(model), tok


def chat(tok, q, **kw):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kw)


def test_the_tiny_models_have_each_familys_layout(qwen):
    """What the engine must reproduce: Qwen2's q/k/v biases and untied head; Qwen3's per-head
    norms, head_dim 32 != hidden / heads = 16, tied head, and no biases."""
    arch, model, _ = qwen
    at = model.model.layers[0].self_attn
    assert type(model).__name__ == f"{arch.capitalize()}ForCausalLM"
    if arch == "qwen2":
        assert at.q_proj.bias is not None and at.k_proj.bias is not None and at.o_proj.bias is None
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    else:
        assert (
            at.q_proj.bias is None
            and at.q_norm.weight.shape == (32,)
            and at.q_proj.weight.shape == (4 * 32, 64)
        )
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert unsupported(model.config) is None


@pytest.mark.parametrize("paths", ["plan", "forced_off"])
def test_greedy_fp32_tokens_equal_hf_generate(qwen, paths, request):
    """With this CPU's fast paths (prepack, C kernel where they run) and with all of them off;
    the prompts share a system prompt, so the shared-prefix prefill runs too."""
    if paths == "forced_off":
        request.getfixturevalue("fast_paths_off")
    arch, model, tok = qwen
    kw = {"enable_thinking": False} if arch == "qwen3" else {}
    prompts = [chat(tok, q, **kw) for q in QUESTIONS]
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    assert shared_prefix_len(ids) >= MIN_SHARED_PREFIX
    params = SamplingParams(max_new_tokens=24, temperature=0)
    ref = HFEngine(model, tok, bf16=False).generate_text(prompts, 1, params)
    got = FastEngine(model, tok, bf16=False).generate_text(prompts, 1, params)
    assert len({tuple(c) for c in ref.completion_ids}) > 1  # the outputs differ per prompt: a real check
    assert got.completion_ids == ref.completion_ids
    assert got.truncated == ref.truncated


def test_qwen3_thinking_switch_prompts_also_match(qwen):
    """Qwen3's enable_thinking=False prompt ends in an empty <think>\\n\\n</think>\\n\\n block:
    another prompt, so other greedy tokens, still the same as HF generate."""
    arch, model, tok = qwen
    if arch != "qwen3":
        pytest.skip("enable_thinking is Qwen3's template switch")
    on, off = chat(tok, QUESTIONS[0]), chat(tok, QUESTIONS[0], enable_thinking=False)
    assert off == on + "<think>\n\n</think>\n\n"
    params = SamplingParams(max_new_tokens=16, temperature=0)
    ref = HFEngine(model, tok, bf16=False).generate_text([on, off], 1, params)
    got = FastEngine(model, tok, bf16=False).generate_text([on, off], 1, params)
    assert ref.completion_ids[0] != ref.completion_ids[1]
    assert got.completion_ids == ref.completion_ids


def test_sampled_logps_match_the_training_forward(qwen):
    _, model, tok = qwen
    prompts = [chat(tok, q) for q in QUESTIONS]
    torch.manual_seed(0)
    ro = FastEngine(model, tok, bf16=False).generate_text(
        prompts, 2, SamplingParams(max_new_tokens=12, temperature=0.7)
    )
    assert [len(x) for x in ro.logps] == [len(c) for c in ro.completion_ids]
    mb = make_micro_batch(ro.prompt_ids, ro.completion_ids, list(range(len(ro.prompt_ids))), tok.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logps(model, mb, temperature=0.7)
    T = mb.mask.shape[1]
    engine = torch.tensor([x + [0.0] * (T - len(x)) for x in ro.logps])
    torch.testing.assert_close(engine * mb.mask, logp, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kernel", [True, False])
def test_bf16_logps_stay_close_to_fp32(qwen, kernel):
    """bf16 weights, decode attention in C (where it builds; head dims 16 and 32) or torch ops."""
    _, model, tok = qwen
    model = copy.deepcopy(model)
    with torch.no_grad():  # shrink the shaken weights back towards ordinary logit sizes
        for p in model.parameters():
            p.mul_(0.3)
    prompts = [chat(tok, q) for q in QUESTIONS]
    torch.manual_seed(0)
    eng = FastEngine(model, tok, bf16=True, kernel=kernel)
    ro = eng.generate_text(prompts, 2, SamplingParams(max_new_tokens=12, temperature=1.0))
    mb = make_micro_batch(ro.prompt_ids, ro.completion_ids, list(range(len(ro.prompt_ids))), tok.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logps(model, mb)
    T = mb.mask.shape[1]
    engine = torch.tensor([x + [0.0] * (T - len(x)) for x in ro.logps])
    gap = ((engine - logp).abs() * mb.mask).max().item()
    assert 0 < gap < 0.05  # bf16 keeps 8 bits of mantissa: log-prob errors of a few hundredths


@pytest.mark.parametrize("grouped", [False, True])
def test_score_equals_the_training_forward(qwen, grouped):
    """FastEngine.score (the frozen KL reference's path) on ragged prompts and completions."""
    _, model, tok = qwen
    prompts = [tok(chat(tok, q), add_special_tokens=False).input_ids for q in QUESTIONS[:2]]
    comps = [[40, 41, 42, 43, 44], [50], [60, 61, 62], [70, 71]]  # 2 per prompt, lengths 5, 1, 3, 2
    if grouped:
        mb = make_grouped_micro_batch(prompts, comps, [0, 1, 2, 3], 2, tok.pad_token_id)
    else:
        mb = make_micro_batch([prompts[i // 2] for i in range(4)], comps, [0, 1, 2, 3], tok.pad_token_id)
    with torch.no_grad():
        want, _ = token_logps(model, mb, temperature=0.8)
    got = FastEngine(model, tok, bf16=False).freeze().score(mb, temperature=0.8)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_qwen3_norms_matter(qwen):
    """The q/k norms are really applied: scaling them changes the greedy text of the engine,
    and it changes it the way it changes HF generate's."""
    arch, model, tok = qwen
    if arch != "qwen3":
        pytest.skip("q_norm / k_norm are Qwen3's")
    model = copy.deepcopy(model)
    prompts = [chat(tok, q) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=16, temperature=0)
    before = FastEngine(model, tok, bf16=False).generate_text(prompts, 1, params).completion_ids
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.mul_(3.0)
    ref = HFEngine(model, tok, bf16=False).generate_text(prompts, 1, params).completion_ids
    got = FastEngine(model, tok, bf16=False).generate_text(prompts, 1, params).completion_ids
    assert got != before and got == ref


# -- models the fast engine does not implement ---------------------------------------------


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def test_an_unsupported_model_type_falls_back_to_hf_with_one_log_line(caplog):
    model, tok = _gpt2()
    with caplog.at_level(logging.INFO, logger="thinkrl"):
        engine = build_engine("fast", model, tok, batch_size=4, bf16=False)
    assert type(engine) is HFEngine
    lines = [r for r in caplog.records if r.name.startswith("thinkrl")]
    assert (
        len(lines) == 1
        and "model type 'gpt2'" in lines[0].getMessage()
        and "hf backend" in lines[0].getMessage()
    )
    prompts = ["<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    assert (
        engine.generate_text(prompts, 2, params).completion_ids
        == HFEngine(model, tok).generate_text(prompts, 2, params).completion_ids
    )
    with pytest.raises(ConfigError, match="model type 'gpt2'.*rollout.backend=hf"):
        FastEngine(model, tok, bf16=False)  # built directly, it still refuses


def test_a_qwen2_with_a_sliding_window_falls_back(tmp_path, caplog):
    """The window changes attention only past its length, but the engine never cuts attention
    short: a config that enables it runs on hf instead."""
    build_tiny_model(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    model, tok = load_model(str(tmp_path))
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    with caplog.at_level(logging.INFO, logger="thinkrl"):
        engine = build_engine("fast", model, tok, batch_size=4, bf16=False)
    assert type(engine) is HFEngine
    assert [r.getMessage() for r in caplog.records if r.name.startswith("thinkrl")] == [
        "rollout.backend=fast cannot run this model (sliding-window attention (8 tokens)); using the hf backend"
    ]


def _grouped_equals_full_rows(model, tok):
    """A grouped micro-batch's log-probs and gradients equal its full rows', in fp64.

    The shaken weights give log-probs of size ~19, where fp32 rounding alone moves either
    path by 1-3e-5 from the fp64 value, and by a different amount on each CPU's kernels
    (2026-12-07, an Intel Xeon with AVX512-BF16 and no AMX, uncapped and capped at AVX2). So the two layouts are
    compared in fp64, where rounding cannot hide a real difference: log-probs to 1e-10. The
    gradients keep the fp32 tolerance, since transformers' RMSNorm computes in fp32 whatever
    the model's dtype (its backward then sums in fp32, in each layout's own order)."""
    model = model.double()
    prompts = [tok(chat(tok, q), add_special_tokens=False).input_ids for q in QUESTIONS[:2]]
    comps = [[40, 41, 42, 43, 44], [50], [60, 61, 62], [70, 71]]
    grouped = make_grouped_micro_batch(prompts, comps, [0, 1, 2, 3], 2, tok.pad_token_id)
    full = make_micro_batch([prompts[i // 2] for i in range(4)], comps, [0, 1, 2, 3], tok.pad_token_id)
    grads = []
    for mb in (full, grouped):
        model.zero_grad()
        logp, _ = token_logps(model, mb)
        assert logp.dtype == torch.float64
        logp.sum().backward()
        grads.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = grads
    assert a[full.mask.bool()].abs().max() > 5  # large log-probs: the case fp32 cannot settle
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    for x, y in zip(ga, gb):  # the shaken weights make gradients of up to ~100: fp32 sums err ~1e-4
        torch.testing.assert_close(x, y, atol=1e-5 * max(1.0, x.abs().max().item()), rtol=1e-4)


def test_packed_training_forward_equals_the_full_rows(qwen):
    """Qwen2's biases and Qwen3's per-head norms sit inside the layers the packed pass runs."""
    from thinkrl.rollout.packed import packable

    _, model, tok = qwen
    model = copy.deepcopy(model).train()
    assert packable(model.config)
    _grouped_equals_full_rows(model, tok)


def test_a_qwen2_with_a_sliding_window_trains_on_full_rows(tmp_path):
    """Packed attention never cuts attention short, so a sliding-window model's grouped
    micro-batches run their full rows, through the model's own masks."""
    from thinkrl.rollout.packed import packable

    build_tiny_model(tmp_path, "qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1)
    model, tok = load_model(str(tmp_path))
    assert not packable(model.config)
    _grouped_equals_full_rows(model.train(), tok)


def test_unsupported_names_each_feature_the_engine_lacks():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    small = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    assert unsupported(LlamaConfig(**small)) is None
    assert unsupported(Qwen2Config(**small)) is None  # its q/k/v biases are implemented
    assert (
        unsupported(Qwen3Config(**small, use_sliding_window=True, max_window_layers=2)) is None
    )  # no layer slides
    assert unsupported(MistralConfig(**small, sliding_window=None)) is None
    cases = [
        (LlamaConfig(**small, hidden_act="gelu"), "activation 'gelu' (supported: silu)"),
        (
            LlamaConfig(**small, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
            "RoPE scaling 'linear'",
        ),
        (LlamaConfig(**small, attention_bias=True), "a bias on the attention output projection"),
        (Qwen3Config(**small, attention_bias=True), "a bias on the attention output projection"),
        (LlamaConfig(**small, mlp_bias=True), "biases in the MLP"),
        (
            MistralConfig(**small, sliding_window=512, max_position_embeddings=4096),
            "sliding-window attention (512 tokens)",
        ),
    ]
    for config, why in cases:
        assert unsupported(config) == why
