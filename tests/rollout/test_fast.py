"""The fast engine against HF ``generate`` and against the training forward pass."""

import copy

import pytest
import torch

from thinkrl.rollout import HFEngine, SamplingParams
from thinkrl.rollout.fast import FastEngine
from thinkrl.trainer.batch import make_micro_batch, token_logps

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Tell me a story about a cat"]  # three lengths


@pytest.fixture
def lively(tiny_pair, shake):
    """tiny-random with its weights shaken, so greedy text is not one repeated token."""
    model, tok = tiny_pair
    model = copy.deepcopy(model)
    return shake(model), tok


def chat(tok, q):
    return tok.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize("paths", ["plan", "forced_off"])
def test_greedy_fp32_tokens_equal_hf_generate(lively, paths, request):
    """With the fast paths this CPU has, and with all of them switched off (as on a CPU
    without them)."""
    if paths == "forced_off":
        request.getfixturevalue("fast_paths_off")
    model, tok = lively
    prompts = [chat(tok, q) for q in PROMPTS]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    ref = HFEngine(model, tok, bf16=False).generate_text(prompts, 1, params)
    got = FastEngine(model, tok, bf16=False).generate_text(prompts, 1, params)
    assert len({tuple(c) for c in ref.completion_ids}) > 1  # the outputs differ per prompt: a real check
    assert got.completion_ids == ref.completion_ids
    assert got.truncated == ref.truncated


def test_sampled_logps_match_the_training_forward(lively):
    model, tok = lively
    prompts = [chat(tok, q) for q in PROMPTS]
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
def test_bf16_logps_stay_close_to_fp32(tiny_pair, kernel):
    """In bf16, with the decode attention in C (where it builds) or on torch ops."""
    model, tok = tiny_pair  # unshaken weights: logits of ordinary size
    prompts = [chat(tok, q) for q in PROMPTS]
    torch.manual_seed(0)
    ro = FastEngine(model, tok, bf16=True, kernel=kernel).generate_text(
        prompts, 2, SamplingParams(max_new_tokens=12, temperature=1.0)
    )
    mb = make_micro_batch(ro.prompt_ids, ro.completion_ids, list(range(len(ro.prompt_ids))), tok.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logps(model, mb)
    T = mb.mask.shape[1]
    engine = torch.tensor([x + [0.0] * (T - len(x)) for x in ro.logps])
    gap = ((engine - logp).abs() * mb.mask).max().item()
    assert 0 < gap < 0.05  # bf16 keeps 8 bits of mantissa: log-prob errors of a few hundredths


def test_fp32_decode_attention_in_c_gives_the_same_tokens_and_logps(lively):
    """In fp32 the C kernel (where it builds) and the torch-ops path sample the same tokens with
    log-probs equal to 1e-4 (as the engine and the training forward are), the rest of the
    engine being the same."""
    from thinkrl.rollout.fast import checked_kernel

    if checked_kernel(torch.float32) is None:
        pytest.skip("no C kernel here (no compiler, or THINKRL_KERNELS=0)")
    model, tok = lively
    prompts = [chat(tok, q) for q in PROMPTS]
    engines = FastEngine(model, tok, bf16=False), FastEngine(model, tok, bf16=False, kernel=False)
    assert engines[0].kernel is not None and engines[1].kernel is None
    outs = []
    for eng in engines:
        torch.manual_seed(5)
        outs.append(eng.generate_text(prompts, 3, SamplingParams(max_new_tokens=16, temperature=1.0)))
    assert outs[0].completion_ids == outs[1].completion_ids
    for a, b in zip(outs[0].logps, outs[1].logps):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,atol", [("oneDNN bf16", 2e-2), ("oneDNN fp32", 1e-5), ("MKL fp32", 1e-5)])
def test_prepacked_weights_give_the_same_tokens_and_logps(lively, kind, atol, cpu_switches):
    """The prepacked linears (oneDNN's for bf16 weights; oneDNN's for fp32 ones, or MKL's packed
    sgemm with THINKRL_ONEDNN_FP32=0) compute what F.linear computes on the same weights.
    Skipped, with the reason, on a CPU where the library cannot pack (oneDNN's bf16 prepack
    needs AVX-512 or AVX-NE-CONVERT)."""
    bf16 = kind.endswith("bf16")
    plan = cpu_switches(**({"THINKRL_ONEDNN_FP32": "0"} if kind == "MKL fp32" else {}))
    ok = {
        "oneDNN bf16": plan.onednn_prepack,
        "oneDNN fp32": plan.onednn_fp32_prepack,
        "MKL fp32": plan.mkl_prepack,
    }
    if not ok[kind]:
        why = (
            "switched off (THINKRL_PREPACK=0)"
            if "THINKRL_PREPACK" in plan.forced_off
            else "does not run on this CPU"
        )
        pytest.skip(f"{kind} prepack {why} ({plan.cpu}, {plan.capability})")
    model, tok = lively
    prompts = [chat(tok, q) for q in PROMPTS]
    packed, plain = FastEngine(model, tok, bf16=bf16), FastEngine(model, tok, bf16=bf16, prepack=False)
    assert packed.prepack and packed.packer.name == kind and not plain.prepack
    outs = []
    for eng in (packed, plain):
        torch.manual_seed(3)
        outs.append(eng.generate_text(prompts, 2, SamplingParams(max_new_tokens=12, temperature=1.0)))
    assert packed.layers[0].packed is not None and plain.layers[0].packed is None
    assert outs[0].completion_ids == outs[1].completion_ids
    for a, b in zip(outs[0].logps, outs[1].logps):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=atol)


def test_the_switches_turn_every_fast_path_off(lively, fast_paths_off):
    """THINKRL_PREPACK=0 and THINKRL_KERNELS=0 (the ``fast_paths_off`` fixture) leave an engine
    with neither prepacked weights nor the C kernel, on any CPU, and it still generates."""
    model, tok = lively
    for bf16 in (False, True):
        eng = FastEngine(model, tok, bf16=bf16)
        ro = eng.generate_text([chat(tok, "Hi")], 2, SamplingParams(max_new_tokens=4, temperature=1.0))
        assert not eng.prepack and eng.kernel is None and eng.layers[0].packed is None
        assert all(len(c) >= 1 for c in ro.completion_ids)


def test_samples_follow_the_softmax(lively):
    """First-token frequencies over 6000 draws match softmax(logits / T) (inverse-CDF sampling)."""
    model, tok = lively
    prompt = chat(tok, "Hi")
    ids = tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    probs = torch.softmax(logits / 1.5, -1)
    torch.manual_seed(0)
    ro = FastEngine(model, tok, bf16=False, batch_size=6000).generate_text(
        [prompt], 6000, SamplingParams(max_new_tokens=1, temperature=1.5)
    )
    counts = torch.bincount(torch.tensor([c[0] for c in ro.completion_ids]), minlength=probs.numel()).float()
    freq = counts / 6000
    top = probs.topk(5).indices
    # binomial std of a frequency is sqrt(p(1-p)/n) <= 0.0065 at n = 6000; allow 4 std
    torch.testing.assert_close(freq[top], probs[top], atol=0.026, rtol=0)


def test_top_k_one_is_greedy(lively):
    model, tok = lively
    prompts = [chat(tok, q) for q in PROMPTS]
    eng = FastEngine(model, tok, bf16=False)
    greedy = eng.generate_text(prompts, 1, SamplingParams(max_new_tokens=10, temperature=0))
    topk1 = eng.generate_text(prompts, 1, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=1))
    assert topk1.completion_ids == greedy.completion_ids


def test_samples_of_one_prompt_are_adjacent_and_stop_at_eos(lively):
    model, tok = lively
    prompts = [chat(tok, q) for q in PROMPTS[:2]]
    ro = FastEngine(model, tok, bf16=False).generate_text(prompts, 3, SamplingParams(max_new_tokens=20))
    assert len(ro.completion_ids) == 6
    p0 = tok(prompts[0], add_special_tokens=False).input_ids
    p1 = tok(prompts[1], add_special_tokens=False).input_ids
    assert ro.prompt_ids == [p0] * 3 + [p1] * 3
    for c, trunc in zip(ro.completion_ids, ro.truncated):
        assert tok.eos_token_id not in c[:-1]  # nothing is kept after an EOS
        assert trunc == (c[-1] != tok.eos_token_id)
        assert trunc == (len(c) == 20) or not trunc


def test_min_new_tokens_bans_eos_until_reached(lively):
    model, tok = lively
    model = copy.deepcopy(model)
    prompts = [chat(tok, q) for q in PROMPTS[:2]]
    eng = FastEngine(model, tok, bf16=False)
    first = eng.generate_text(prompts, 1, SamplingParams(max_new_tokens=1, temperature=0)).completion_ids
    with torch.no_grad():  # give EOS twice the logit of prompt 0's greedy first token: it now wins early
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = 2 * head[first[0][0]]
    eng.sync_weights(model)  # the engine samples from its copy of the weights until told
    torch.manual_seed(0)
    free = eng.generate_text(prompts, 4, SamplingParams(max_new_tokens=20))
    assert any(not t for t in free.truncated)  # without the ban some rows stop early: the ban matters
    torch.manual_seed(0)
    ro = eng.generate_text(prompts, 4, SamplingParams(max_new_tokens=20, min_new_tokens=20))
    assert all(len(c) == 20 and tok.eos_token_id not in c for c in ro.completion_ids)
    assert all(ro.truncated)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, min_new_tokens=12)
    ref = HFEngine(model, tok, bf16=False).generate_text(prompts, 1, greedy)
    assert (
        eng.generate_text(prompts, 1, greedy).completion_ids == ref.completion_ids
    )  # HF's min_new_tokens too


def test_banned_tokens_are_never_drawn_and_logps_renormalise():
    logits = torch.tensor([[5.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)  # token 0 would win ~97% of draws
    torch.manual_seed(0)
    tok, lp = FastEngine._sample(logits.clone(), SamplingParams(temperature=1.0), torch.tensor([0]))
    assert 0 not in tok.tolist()
    expect = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0]), -1)  # softmax over the allowed tokens
    torch.testing.assert_close(lp, expect[tok - 1])
    freq = torch.bincount(tok, minlength=4).float() / 4000
    # binomial std <= 0.008 at n = 4000; allow 4 std
    torch.testing.assert_close(freq[1:], expect.exp(), atol=0.032, rtol=0)


def test_lora_policy_greedy_fp32_tokens_equal_hf_generate(lively):
    """With a peft LoRA policy the engine samples from the effective weights W + (alpha / r) B A:
    its greedy tokens equal HF ``generate`` on the wrapped model, differ from the base model's,
    and syncing leaves the adapter unmerged."""
    from thinkrl.config import LoraConfig
    from thinkrl.trainer.common import apply_lora

    base, tok = lively
    prompts = [chat(tok, q) for q in PROMPTS]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    base_ids = FastEngine(base, tok, bf16=False).generate_text(prompts, 1, params).completion_ids
    policy = apply_lora(
        copy.deepcopy(base),
        LoraConfig(
            enabled=True,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ref = HFEngine(policy, tok, bf16=False).generate_text(prompts, 1, params)
    got = FastEngine(policy, tok, bf16=False).generate_text(prompts, 1, params)
    assert ref.completion_ids != base_ids  # the adapter changes the greedy text: a real check
    assert got.completion_ids == ref.completion_ids
    assert not any(getattr(m, "merged", False) for m in policy.modules())


@pytest.mark.parametrize("grouped", [False, True])
def test_score_equals_the_training_forward(lively, grouped):
    """FastEngine.score (used for the frozen KL reference) gives token_logps' values in fp32,
    for plain and prompt-once grouped micro-batches, with ragged prompts and completions."""
    from thinkrl.trainer.batch import make_grouped_micro_batch

    model, tok = lively
    prompts = [tok(chat(tok, q), add_special_tokens=False).input_ids for q in PROMPTS[:2]]
    comps = [[40, 41, 42, 43, 44], [50], [60, 61, 62], [70, 71]]  # 2 per prompt, lengths 5, 1, 3, 2
    if grouped:
        mb = make_grouped_micro_batch(prompts, comps, [0, 1, 2, 3], 2, tok.pad_token_id)
    else:
        mb = make_micro_batch([prompts[i // 2] for i in range(4)], comps, [0, 1, 2, 3], tok.pad_token_id)
    with torch.no_grad():
        want, _ = token_logps(model, mb, temperature=0.8)
    got = FastEngine(model, tok, bf16=False).freeze().score(mb, temperature=0.8)
    assert want.abs().sum() > 0 and (want[1, 1:] == 0).all()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_sampling_logps_on_a_wide_logit_range_equal_log_softmax():
    """Logits spanning 400 nats (the exp argument is clamped at -80 for speed): the sampled
    tokens' log-probs still equal log_softmax, greedy and sampled, and -inf stays impossible."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5000, generator=g) * 100
    logits[:, 7] = float("-inf")
    ref = torch.log_softmax(logits, -1)
    for temp in (0.0, 1.0):
        torch.manual_seed(1)
        tok, lp = FastEngine._sample(logits.clone(), SamplingParams(temperature=temp))
        assert (tok != 7).all()
        assert torch.allclose(lp, ref.gather(-1, tok[:, None]).squeeze(-1), atol=1e-4)
    assert torch.equal(
        FastEngine._sample(logits.clone(), SamplingParams(temperature=0.0))[0], logits.argmax(-1)
    )


@pytest.mark.parametrize("paths", ["plan", "forced_off"])
def test_logps_stay_exact_while_finished_rows_are_dropped(lively, paths, request):
    """Rows that end early leave the batch (their generated caches are compacted, the shared
    prompt part runs on a buffer of all rows): the surviving rows' log-probs must still equal
    the training forward's, in fp32, for every token before and after the drops (with this
    CPU's fast paths, and with them switched off)."""
    if paths == "forced_off":
        request.getfixturevalue("fast_paths_off")
    model, tok = lively
    model = copy.deepcopy(model)
    prompts = [chat(tok, q) for q in PROMPTS]
    eng = FastEngine(model, tok, bf16=False)
    first = eng.generate_text(prompts, 1, SamplingParams(max_new_tokens=1, temperature=0)).completion_ids
    with torch.no_grad():  # make EOS likely enough that rows end at many different steps
        head = model.get_output_embeddings().weight
        head[tok.eos_token_id] = 1.2 * head[first[0][0]]
    eng.sync_weights(model)
    torch.manual_seed(0)
    ro = eng.generate_text(prompts, 8, SamplingParams(max_new_tokens=24, temperature=1.0))
    lengths = sorted(len(c) for c in ro.completion_ids)
    # a quarter of the 24 rows ended while at least one row was still running: rows were dropped
    assert lengths[5] < lengths[-1] and not all(ro.truncated)
    mb = make_micro_batch(ro.prompt_ids, ro.completion_ids, list(range(len(ro.prompt_ids))), tok.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logps(model, mb)
    T = mb.mask.shape[1]
    engine = torch.tensor([x + [0.0] * (T - len(x)) for x in ro.logps])
    torch.testing.assert_close(engine * mb.mask, logp, atol=1e-4, rtol=0)


def _attention_case(
    seed: int, dropped: bool, rep: int = 3, hd: int = 16, dtype=torch.bfloat16, sharp: float = 1.0
):
    """Random decode-attention inputs in ``dtype``: 3 prompts (left padding 0, 2, 5 of P = 9)
    x 4 samples, 3 key heads x ``rep`` query heads each of size ``hd``, generated slot t = 5
    of T = 8; optionally with rows 1, 6, 7 and 10 dropped. ``sharp`` scales the queries: at 30
    most scores lie more than 87 under their row's maximum, where e^x leaves fp32's normal range."""
    from thinkrl.rollout.fast import _DecodeState

    g, n, nkv, P, T, t = 3, 4, 3, 9, 8, 5
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    pstart = torch.tensor([0, 2, 5])
    alive = torch.tensor([0, 2, 3, 4, 5, 8, 9, 11]) if dropped else torch.arange(g * n)
    b = alive.numel()
    bias = torch.zeros(1, b, 1, P + T)
    for i, row in enumerate(alive.tolist()):
        bias[0, i, 0, : pstart[row // n]] = float("-inf")
    st = _DecodeState(
        groups=g, n=n, rep=rep, caches=[], bias=bias, pstart=pstart, alive=alive, group=alive // n, t=t
    )
    if dropped:
        st.q_buf, st.p_buf = (
            torch.zeros(nkv, g * n, rep, hd).to(dtype),
            torch.zeros(nkv, g * n, rep, P).to(dtype),
        )
    cache = [r(nkv, g, hd, P), r(nkv, g, P, hd), r(nkv, b, hd, T), r(nkv, b, T, hd)]
    qkv = r(b, (nkv * rep + 2 * nkv) * hd)  # the fused projection's output: query, key and value heads
    qkv[:, : nkv * rep * hd] *= sharp
    q, k, v = (
        qkv[:, : nkv * rep * hd],
        qkv[:, nkv * rep * hd : (nkv * rep + nkv) * hd],
        qkv[:, (nkv * rep + nkv) * hd :],
    )
    want = torch.zeros(b, nkv * rep, hd)  # fp32 reference, one (row, key head) at a time
    for i, row in enumerate(alive.tolist()):
        grp, ps = row // n, pstart[row // n]
        for h in range(nkv):
            keys = torch.cat(
                [cache[0][h, grp, :, ps:].T, cache[2][h, i, :, :t].T, k[i, h * hd : (h + 1) * hd][None]]
            )
            vals = torch.cat([cache[1][h, grp, ps:], cache[3][h, i, :t], v[i, h * hd : (h + 1) * hd][None]])
            qh = q[i].view(nkv * rep, hd)[h * rep : (h + 1) * rep]
            want[i, h * rep : (h + 1) * rep] = (
                torch.softmax(qh.double() @ keys.double().T, -1) @ vals.double()
            ).float()
    return st, cache, q, k, v, want.view(b, -1)


CASES = [
    (d, r, h, 1.0, dt)
    for dt in ("bf16", "fp32")
    for d, r, h in ((False, 3, 16), (True, 3, 16), (True, 7, 80))
]


@pytest.mark.parametrize("dropped,rep,hd,sharp,dtype", CASES + [(False, 3, 16, 30.0, "fp32")])
def test_decode_attention_paths_equal_a_reference(dropped, rep, hd, sharp, dtype):
    """The torch-ops cascade attention and the C kernel (where it builds) both compute
    softmax(q K^T) V over a row's prompt (shared by its group, left padding masked) and its
    generated tokens, and both write the new key/value into generated slot t, on bf16 and on
    fp32 caches. (7 query heads per key head and hd 80 take the kernel's paths for more than 4
    queries and a last block of 16 dimensions; ``sharp`` its exponential's underflow.)"""
    from thinkrl.rollout.fast import _cascade_attention
    from thinkrl.rollout.kernels import decode_attention, decode_attention_kernel

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    st, cache, q, k, v, want = _attention_case(0, dropped, rep, hd, dtype, sharp)
    # bf16: the torch path rounds scores and probabilities to bf16; the kernel only its output.
    # fp32: both round as fp32 arithmetic does (the reference is fp64), scores of size ~sharp.
    tol_torch, tol_kernel = (3e-2, 1e-2) if dtype == torch.bfloat16 else (1e-5 * sharp, 1e-5 * sharp)
    b, nkv, hd = q.shape[0], cache[0].shape[0], cache[0].shape[2]
    c1 = [x.clone() for x in cache]
    got = _cascade_attention(q.reshape(b, -1, hd), k.reshape(b, nkv, hd), v.reshape(b, nkv, hd), c1, st)
    torch.testing.assert_close(got.float(), want, atol=tol_torch, rtol=tol_torch)
    assert torch.equal(c1[2][:, :, :, st.t], k.reshape(b, nkv, hd).transpose(0, 1))
    assert torch.equal(c1[3][:, :, st.t], v.reshape(b, nkv, hd).transpose(0, 1))
    fn = decode_attention_kernel()
    if fn is None:
        pytest.skip("no C kernel here (no compiler, or THINKRL_KERNELS=0)")
    c2 = [x.clone() for x in cache]
    out = decode_attention(
        fn, q, k, v, *c2, st.group, st.pstart, st.t, torch.empty(b, q.shape[1], dtype=q.dtype)
    )
    torch.testing.assert_close(out.float(), want, atol=tol_kernel, rtol=tol_kernel)
    assert torch.equal(c2[2], c1[2]) and torch.equal(c2[3], c1[3])


def test_kernel_loader_falls_back_cleanly(monkeypatch, tmp_path, caplog):
    """THINKRL_KERNELS=0 or a failing build give None (the torch-ops path), never an error; a
    build lands in THINKRL_CACHE once and is reused."""
    from thinkrl.rollout import kernels

    monkeypatch.setattr(kernels, "_libs", {})
    monkeypatch.setenv("THINKRL_KERNELS", "0")
    assert kernels.decode_attention_kernel() is None
    monkeypatch.setattr(kernels, "_libs", {})
    monkeypatch.setenv("THINKRL_KERNELS", "1")
    monkeypatch.setenv("THINKRL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level("WARNING"):
        assert kernels.decode_attention_kernel() is None
    assert "kernel unavailable" in caplog.text
    monkeypatch.setattr(kernels, "_libs", {})
    monkeypatch.delenv("CC")
    import shutil

    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler here")
    first = kernels._build("native")
    assert first.parent == tmp_path / "kernels" and first.exists()
    mtime = first.stat().st_mtime_ns
    assert kernels._build("native") == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_a_kernel_that_disagrees_is_not_used(monkeypatch, caplog):
    """The engine checks the C kernel against the torch path before using it: a kernel that
    writes wrong numbers (here: one that leaves its output untouched) is refused with a warning."""
    from thinkrl.rollout import fast

    real = fast.decode_attention

    def broken(fn, *args):
        out = args[-1]
        real(fn, *args)
        return out.zero_()

    monkeypatch.setattr(fast, "_CHECKED", {})
    monkeypatch.setattr(fast, "decode_attention", broken)
    if fast.decode_attention_kernel() is None:
        pytest.skip("no C kernel here (no compiler, or THINKRL_KERNELS=0)")
    with caplog.at_level("WARNING"):
        assert fast.checked_kernel() is None
    assert "disagrees" in caplog.text


@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_kernel_built_for_an_older_x86_cpu_agrees(monkeypatch, tmp_path, march):
    """The kernel is portable C: built for AVX2 (haswell) or plain SSE2 (x86-64), as on CPUs
    without AVX-512 (8-lane vectors instead of 16), it computes what the torch path computes.
    (Run where this CPU can execute that target: on x86 with AVX2.)"""
    import platform

    from thinkrl.rollout import fast, kernels

    if platform.machine() != "x86_64" or not torch.cpu._is_avx2_supported():
        pytest.skip(f"-march={march} code cannot run on this CPU ({platform.machine()})")
    monkeypatch.setenv("THINKRL_KERNEL_MARCH", march)
    monkeypatch.setenv("THINKRL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_libs", {})
    fn = kernels.decode_attention_kernel()
    if fn is None:
        pytest.skip("no C kernel here (no compiler, or THINKRL_KERNELS=0)")
    assert fast._kernel_error(fn, torch.bfloat16) < fast.KERNEL_TOL[torch.bfloat16] == 2e-2
    assert fast._kernel_error(fn, torch.float32) < fast.KERNEL_TOL[torch.float32] == 1e-5


def test_a_shared_prompt_prefix_runs_once_and_changes_nothing(lively, monkeypatch):
    """Prompts with a long common prefix (a system prompt and a few-shot turn) and tails of
    different lengths: the engine runs the prefix once, then the tails (one extra prefill pass,
    whose first call has a single row), and gives the same tokens and log-probs as running
    every prompt in full (fp32), in generate and in score."""
    import thinkrl.rollout.base as rollout  # where shared_prefix_len reads MIN_SHARED_PREFIX

    model, tok = lively
    shot = [
        {"role": "system", "content": "You add numbers. Think step by step, then answer."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "It is 2."},
    ]
    prompts = [
        tok.apply_chat_template(
            shot + [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in PROMPTS
    ]
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    import os

    L = len(os.path.commonprefix(ids))
    assert (
        L >= rollout.MIN_SHARED_PREFIX and len({len(x) for x in ids}) > 1
    )  # a real shared prefix, ragged tails
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    rows = []
    eng = FastEngine(model, tok, bf16=False)
    real = eng._forward
    monkeypatch.setattr(eng, "_forward", lambda ids, *a, **k: rows.append(ids.shape) or real(ids, *a, **k))
    torch.manual_seed(5)
    shared = eng.generate_text(prompts, 2, params)
    assert rows[0] == (1, L) and rows[1][0] == 3  # the prefix alone, then the three tails
    monkeypatch.setattr(rollout, "MIN_SHARED_PREFIX", 10**6)  # no sharing: every prompt in full
    rows.clear()
    torch.manual_seed(5)
    full = eng.generate_text(prompts, 2, params)
    assert rows[0] == (3, max(len(x) for x in ids))
    assert shared.completion_ids == full.completion_ids
    for a, b in zip(shared.logps, full.logps):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    # score (the frozen KL reference's path) against the training forward
    from thinkrl.trainer.batch import make_grouped_micro_batch

    monkeypatch.setattr(rollout, "MIN_SHARED_PREFIX", 16)
    mb = make_grouped_micro_batch(ids, shared.completion_ids, list(range(6)), 2, tok.pad_token_id)
    with torch.no_grad():
        want, _ = token_logps(model, mb)
    torch.testing.assert_close(eng.score(mb), want, atol=1e-4, rtol=0)
