"""Generation over the engine interface, the `pmod generate` command, and engine input checks."""

from __future__ import annotations

import numpy as np
import pytest

import pmod
from builders import hf_llama, random_tensors, tiny_config, write_checkpoint
from pmod.app.cli import main
from pmod.errors import PmodError
from pmod.app.generate import Sampler, SamplerArgs, generate_tokens
from tiny_tokenizer import write_tiny_tokenizer


def test_sampler_greedy_and_seeded():
    logits = np.array([0.1, 2.0, -1.0, 1.9], np.float32)
    assert Sampler(SamplerArgs(temp=0))(logits) == 1
    a = [Sampler(SamplerArgs(temp=1.0, seed=7))(logits) for _ in range(3)]
    s = Sampler(SamplerArgs(temp=1.0, seed=7))
    assert a[0] == s(logits)
    # top_p smaller than the top token's probability keeps only the argmax.
    s = Sampler(SamplerArgs(temp=1.0, top_p=0.05, seed=0))
    assert {s(logits) for _ in range(50)} == {1}


def test_sampler_distribution_matches_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(SamplerArgs(temp=1.0, seed=123))
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # Nucleus 0.75 keeps {0, 1} (cumulative 0.5, 0.8: the smallest set reaching 0.75), renormalised.
    s = Sampler(SamplerArgs(temp=1.0, top_p=0.75, seed=123))
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.03)


@pytest.fixture
def dense_model(tmp_path):
    config = tiny_config(mod_target_layers=None)
    tensors = random_tensors(config, seed=3)
    path = write_checkpoint(tmp_path, config, tensors)
    write_tiny_tokenizer(path, config.vocab_size)
    return path, config, tensors


def test_generate_cli_equals_transformers_greedy(dense_model, capsys):
    pytest.importorskip("pmod_mlx")
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    path, config, tensors = dense_model
    prompt = "what colour is the circle ?"
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--max-tokens", "12",
                 "--temp", "0", "--dtype", "float32"]) == 0
    out = capsys.readouterr()
    tok = AutoTokenizer.from_pretrained(str(path))
    # The Vicuna v1 template, written out (official conv_vicuna_v1).
    templated = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions. USER: "
                 f"{prompt} ASSISTANT:")
    ids = tok(templated, return_tensors="pt")["input_ids"]
    hf = hf_llama(config, tensors)
    with torch.no_grad():
        # An explicit mask: the tiny tokenizer maps unseen characters to <unk> = 0, which
        # generate() would otherwise take for padding.
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=2, pad_token_id=0)
    expected = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.out == expected + "\n"
    assert out.err == ""  # statistics only with --verbose


def test_generate_verbose_and_mod_model(tmp_path, capsys):
    pytest.importorskip("pmod_mlx")
    config = tiny_config()
    path = write_checkpoint(tmp_path, config, random_tensors(config, seed=1))
    write_tiny_tokenizer(path, config.vocab_size)
    assert main(["generate", "--model", str(path), "--prompt", "hello", "--max-tokens", "5",
                 "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "prompt:" in err and "tokens/s" in err and "peak memory" in err


def test_generate_stops_at_eos_and_context(tmp_path):
    pytest.importorskip("pmod_mlx")
    config = tiny_config(mod_target_layers=None, max_position_embeddings=16)
    tensors = random_tensors(config, seed=2)
    engine = pmod.open_engine(write_checkpoint(tmp_path, config, tensors), dtype="float32")
    toks = list(generate_tokens(engine, np.arange(3, 10), max_tokens=50))
    assert 0 < len(toks) <= 16 - 7 + 1 and engine.position <= 16
    engine.reset()
    first = int(np.argmax(engine.prefill(input_ids=np.arange(3, 10))))
    engine.reset()
    assert list(generate_tokens(engine, np.arange(3, 10), max_tokens=5, eos_ids=[first])) == []


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pmod: error:"), err
    return err[0]


def test_generate_cli_errors(dense_model, tmp_path, capsys):
    pytest.importorskip("pmod_mlx")
    path, _, _ = dense_model
    long_prompt = "what colour is the circle ? " * 50  # > 512 tokens with the template
    assert main(["generate", "--model", str(path), "--prompt", long_prompt]) == 2
    assert "too long" in _error_line(capsys)
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--top-p", "0"]) == 2
    assert "--top-p" in _error_line(capsys)
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    _error_line(capsys)
    (path / "tokenizer.json").unlink()
    assert main(["generate", "--model", str(path), "--prompt", "hi"]) == 2
    assert "tokenizer" in _error_line(capsys)
    assert main(["generate", "--model", str(path), "--prompt", "hi", "--backend", "cuda"]) == 2
    _error_line(capsys)


def test_engine_rejects_bad_inputs(make_checkpoint):
    pytest.importorskip("pmod_mlx")
    engine = pmod.open_engine(make_checkpoint(), dtype="float32")
    H = engine.config.hidden_size
    cases = [
        (dict(), "exactly one"),
        (dict(input_ids=[1, 2], inputs_embeds=np.zeros((2, H))), "exactly one"),
        (dict(input_ids=np.zeros((2, 3), int)), "batch size 1"),
        (dict(inputs_embeds=np.zeros((3, H + 1), np.float32)), f"[T, {H}]"),
        (dict(inputs_embeds=np.zeros((3, H), np.float32), vision_mask=np.ones(4, bool)), "vision_mask"),
        (dict(input_ids=np.array([1.5, 2.0])), "integers"),
        (dict(input_ids=np.zeros(513, int)), "too long"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(PmodError, match=None) as info:
            engine.prefill(**kwargs)
        assert needle in str(info.value), (kwargs.keys(), str(info.value))
    assert engine.position == 0 and engine.kv_lengths() == [0] * engine.config.num_hidden_layers
    with pytest.raises(PmodError, match="unknown backend"):
        pmod.open_engine(make_checkpoint(), backend="nope")
