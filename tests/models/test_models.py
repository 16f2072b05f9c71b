import pytest
import torch

from thinkrl.models import ModelError, _build_tiny, load_model, resolve, save_model


def test_tiny_random_loads(tiny_pair):
    model, tok = tiny_pair
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    # 256 byte tokens + <|endoftext|>, <|im_start|>, <|im_end|>
    assert len(tok) == 259 and model.config.vocab_size == 259
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert model.generation_config.pad_token_id == 256
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tokenizer_round_trips_text_and_chat_tokens(tiny_pair):
    tok = tiny_pair[1]
    text = "<|im_start|>user\nWhat is 3 × 4? Ünïcödé, emoji 🙂\t<think> x </think><|im_end|>\n<|endoftext|>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    # each special token is one id; everything else is one id per UTF-8 byte
    specials = {256: "<|endoftext|>", 257: "<|im_start|>", 258: "<|im_end|>"}
    assert [i for i in ids if i >= 256] == [257, 258, 256]
    plain = text
    for s in specials.values():
        plain = plain.replace(s, "")
    assert sum(1 for i in ids if i < 256) == len(plain.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == plain


def test_tiny_random_is_built_from_a_fixed_seed(tiny_pair, tmp_path):
    rebuilt = tmp_path / "tiny"
    rebuilt.mkdir()
    _build_tiny(rebuilt)
    model, _ = load_model(str(rebuilt))
    for (k, a), (_, b) in zip(tiny_pair[0].state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def test_save_model_then_transformers_loads_identical_logits(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = tiny_pair
    save_model(model, tok, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    tok2 = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = torch.tensor([tok("Hello, world! 1 + 2 = 3", add_special_tokens=False).input_ids])
    assert tok2("Hello, world! 1 + 2 = 3", add_special_tokens=False).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_missing_path_raises_model_error(tmp_path):
    for name in (str(tmp_path / "nope"), "./no/such/model", "runs/x/final", "missing.gguf"):
        with pytest.raises(ModelError, match="does not exist"):
            load_model(name)


def test_folder_without_config_and_non_gguf_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        resolve(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelError, match="not a .gguf file"):
        resolve(str(tmp_path / "weights.bin"))


def test_unknown_hub_id_raises_model_error_offline():
    with pytest.raises(ModelError, match="not a built-in name .*could not be fetched"):
        load_model("nobody-xyz/does-not-exist-xyz")


def test_tiny_qwen3_has_think_tokens_and_the_enable_thinking_template(tmp_path):
    from thinkrl.models import build_tiny_model

    build_tiny_model(tmp_path, "qwen3")
    model, tok = load_model(str(tmp_path))
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.head_dim == 32
    # <think> and </think> are added after the 259 byte and special tokens, one id each, kept by decode
    ids = tok("<think>x</think>", add_special_tokens=False).input_ids
    assert len(tok) == 261 and ids[0] == 259 and ids[2] == 260 and len(ids) == 3
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think>"
    msgs = [{"role": "user", "content": "Hi"}]
    on = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"


def test_unknown_tiny_family_is_a_model_error(tmp_path):
    from thinkrl.models import build_tiny_model

    with pytest.raises(ModelError, match="tiny model family 'gpt9' unknown"):
        build_tiny_model(tmp_path, "gpt9")
