"""The CPU-runnable parts of scripts/gpu_check.sh: its options, and the random models of real
architectures it benchmarks (thinkrl/models/archs.py), built on the meta device."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thinkrl.models import ModelError, build_tiny_tokenizer
from thinkrl.models.archs import arch_config, arch_names, build_random, n_params

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"

# Parameter counts, worked by hand from the published configs (tied embeddings counted once):
# SmolLM2-135M: embeddings 49152 * 576 = 28,311,552; per layer q 576*576 + k, v 576*192 each +
#   o 576*576 + MLP 3 * 576 * 1536 + 2 norms * 576 = 3,540,096; 30 layers = 106,202,880; + final
#   norm 576: 134,515,008.
# Qwen2.5-1.5B: embeddings 151936 * 1536 = 233,373,696; per layer q 1536*1536 + 1536 bias,
#   k and v 1536*256 + 256 each, o 1536*1536, MLP 3 * 1536 * 8960, 2 norms * 1536 = 46,797,824;
#   28 layers = 1,310,339,072 (the model card's 1.31B non-embedding); + 1536: 1,543,714,304.
PARAMS = {"smollm2-135m": 134_515_008, "qwen2.5-1.5b": 1_543_714_304}


def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_both_architectures_have_their_published_sizes():
    tok = build_tiny_tokenizer()
    assert arch_names() == sorted(PARAMS)
    for name, want in PARAMS.items():
        model = build_random(name, tok, device="meta")  # no memory: shapes only
        assert n_params(model) == want, name
        assert model.config.eos_token_id == tok.eos_token_id  # stops where the tokenizer says


def test_the_configs_keep_the_architecture_numbers_and_the_fast_engine_runs_both():
    from thinkrl.rollout.fast import unsupported

    s, q = arch_config("smollm2-135m"), arch_config("qwen2.5-1.5b")
    assert (s.model_type, s.num_attention_heads, s.num_key_value_heads) == ("llama", 9, 3)
    assert s.rope_parameters["rope_theta"] == 100000 and q.rope_parameters["rope_theta"] == 1e6
    assert (q.model_type, q.num_attention_heads, q.num_key_value_heads, q.intermediate_size) == (
        "qwen2",
        12,
        2,
        8960,
    )
    assert s.tie_word_embeddings and q.tie_word_embeddings and not q.use_sliding_window
    assert unsupported(s) is None and unsupported(q) is None
    with pytest.raises(
        ModelError, match="architecture 'gpt9' unknown; choose from: qwen2.5-1.5b, smollm2-135m"
    ):
        arch_config("gpt9")


def test_options_are_checked(capsys):
    mod = gpu_check_module()
    args = mod.parse_args(["--archs", "smollm2-135m", "--only", "bench", "--steps", "2"])
    assert (
        args.archs == ["smollm2-135m"]
        and args.only == ["bench"]
        and args.steps == 2
        and args.device == "cuda"
    )
    with pytest.raises(SystemExit):
        mod.parse_args(["--archs", "gpt9"])
    assert "unknown gpt9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.parse_args(["--new-tokens", "0"])
    assert "--new-tokens must be >= 1" in capsys.readouterr().err


def test_the_task_it_writes_has_right_answers(tmp_path):
    rows = [
        json.loads(line)
        for line in gpu_check_module().write_task(tmp_path / "t.jsonl", 12).read_text().splitlines()
    ]
    assert rows[3] == {"question": "What is 3 + 0?", "answer": "3"}  # a = 3, b = (3*3 + 1) % 10 = 0
    assert all(int(r["answer"]) == sum(int(x) for x in r["question"][8:-1].split(" + ")) for r in rows)


def run_script(*args):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_the_dry_run_builds_the_models_and_prints_the_plan(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "x-1.0-py3-none-any.whl").write_bytes(b"")
    r = run_script("--dry-run", "--wheels", str(wheels), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert (
        "smollm2-135m: 134,515,008 parameters" in r.stdout
        and "qwen2.5-1.5b: 1,543,714,304 parameters" in r.stdout
    )
    assert f"pip install --no-index --find-links {wheels} --no-deps" in r.stdout
    assert "-m pytest -q -m cuda" in r.stdout and "device=cuda max_steps=3" in r.stdout
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_a_missing_or_empty_wheels_folder_is_one_clear_error(tmp_path):
    r = run_script("--dry-run", "--wheels", str(tmp_path / "nope"))
    assert r.returncode == 2 and "wheels folder" in r.stderr and "does not exist" in r.stderr
    r = run_script("--dry-run", "--wheels", str(tmp_path))
    assert r.returncode == 2 and "no .whl files" in r.stderr
