"""The text-family seam (``pmod.architectures``): separate q/k/v and o bias flags, and a
second family plugged in through the registries alone.

* Qwen2's decoder is LLaMA's with biases on q/k/v only. pmod's LLaMA family with
  ``qkv_bias=True, o_bias=False`` must equal transformers' own ``Qwen2ForCausalLM`` on the
  same weights, on the MLX and the torch backend.
* A test-only toy family (LLaMA with a tanh-GELU gated MLP, as Gemma's) registered in the
  core and in each runtime's ``FAMILIES`` runs p-MoD prefill and decode on MLX and torch,
  checked against the float64 reference with the same MLP; without its runtime entry a
  backend refuses it in one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from builders import random_tensors, tiny_config, vision_inputs, write_checkpoint
from reference import Reference

import pmod
from pmod import architectures
from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.format import expected_tensors

BACKENDS = ("mlx", "torch")


def _logits(backend, path, **prefill):
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    engine = pmod.open_engine(path, backend=backend, dtype="float32")
    first = engine.prefill(**prefill)
    steps = [first]
    for _ in range(4):
        steps.append(engine.decode(int(np.argmax(steps[-1]))))
    return np.array(steps), engine


def _tol(logits):
    return 2e-5 * max(1.0, float(np.abs(logits).max()))


def test_bias_flags_name_their_tensors():
    c = tiny_config(qkv_bias=True, o_bias=False)
    names = expected_tensors(c)
    assert "language_model.layers.0.self_attn.q_proj.bias" in names
    assert "language_model.layers.0.self_attn.v_proj.bias" in names
    assert "language_model.layers.0.self_attn.o_proj.bias" not in names
    both = tiny_config(attention_bias=True)  # HF LLaMA's one flag covers all four
    assert both.qkv_bias and both.o_bias
    back = PmodConfig.from_dict(c.to_dict())
    assert (back.qkv_bias, back.o_bias, back.text_model_type) == (True, False, "llama")


@pytest.mark.parametrize("backend", BACKENDS)
def test_qkv_bias_only_matches_transformers_qwen2(tmp_path, backend):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = tiny_config(mod_target_layers=None, qkv_bias=True, o_bias=False, tie_word_embeddings=False)
    tensors = random_tensors(config, seed=3)
    c = config
    hcfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                       num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                       rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                       tie_word_embeddings=False, use_sliding_window=False)
    hcfg._attn_implementation = "eager"
    hf = Qwen2ForCausalLM(hcfg).eval()
    sd = {("lm_head.weight" if n == "language_model.lm_head.weight" else "model." + n[len("language_model."):]):
          torch.from_numpy(a) for n, a in tensors.items() if n.startswith("language_model.")}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    ids = np.random.default_rng(4).integers(0, c.vocab_size, 23)
    path = write_checkpoint(tmp_path, config, tensors)
    ours, _ = _logits(backend, path, input_ids=ids)
    seq = list(ids) + [int(np.argmax(s)) for s in ours[:-1]]
    with torch.no_grad():
        want = hf(torch.tensor([seq])).logits[0].double().numpy()[len(ids) - 1:]
    err = np.abs(ours - want).max()
    assert err <= _tol(want), f"{backend}: max err {err:.3g} against transformers' Qwen2"


# ----------------------------------------------------------------------------- a toy family
def _gelu_tanh(x, lib):
    return 0.5 * x * (1.0 + lib.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))


class ToyReference(Reference):
    """The float64 reference with the toy family's MLP."""

    def _mlp(self, l, x):
        g = self._lin(x, l, "mlp.gate_proj")
        return self._lin(_gelu_tanh(g, np) * self._lin(x, l, "mlp.up_proj"), l, "mlp.down_proj")


def _register_toy(monkeypatch, runtimes=BACKENDS):
    """The toy family in the core and in the named runtimes, as its own module would add it:
    each runtime's LLaMA attention with a gated tanh-GELU MLP."""
    monkeypatch.setitem(architectures.FAMILIES, "toy", architectures.TextFamily("toy", ("gelu_pytorch_tanh",)))
    for runtime in runtimes:
        lib = pytest.importorskip("mlx.core" if runtime == "mlx" else "torch")
        if runtime == "mlx":
            from pmod_mlx import language as decoder
        else:
            from pmod_export import decoder

        def toy_mlp(self, x, lib=lib):
            return self.down_proj(_gelu_tanh(self.gate_proj(x), lib) * self.up_proj(x))

        call = "__call__" if runtime == "mlx" else "forward"
        toy = type("ToyMLP", (decoder.MLP,), {call: toy_mlp})
        monkeypatch.setitem(decoder.FAMILIES, "toy", (decoder.Attention, toy))


@pytest.mark.parametrize("backend", BACKENDS)
def test_toy_family_through_the_registries(tmp_path, monkeypatch, backend):
    _register_toy(monkeypatch)
    config = tiny_config(text_model_type="toy", hidden_act="gelu_pytorch_tanh", qkv_bias=True)
    tensors = random_tensors(config, seed=5)
    path = write_checkpoint(tmp_path, config, tensors)
    assert json.loads((path / "config.json").read_text())["text_model_type"] == "toy"
    T, vm = 30, np.zeros(30, dtype=bool)
    vm[4:24] = True
    ids = np.random.default_rng(6).integers(3, config.vocab_size, T)
    emb = vision_inputs(tensors, ids, vm, seed=6)
    ours, engine = _logits(backend, path, inputs_embeds=emb, vision_mask=vm)
    ref = ToyReference(config.to_dict(), tensors)
    want = [ref.prefill(embeds=emb, vision_mask=vm)[-1]]
    for s in ours[:-1]:
        want.append(np.reshape(ref.decode(int(np.argmax(s))), (-1, config.vocab_size))[-1])
    want = np.array(want)
    assert engine.kv_lengths() == ref.kv_lengths() and min(ref.kv_lengths()) < T + 4  # MoD layers routed
    err = np.abs(ours - want).max()
    assert err <= _tol(want), f"{backend}: toy family max err {err:.3g} against the float64 reference"
    llama = ToyReference(tiny_config(qkv_bias=True).to_dict(), tensors)
    llama._mlp = lambda l, x: Reference._mlp(llama, l, x)
    assert np.abs(llama.prefill(embeds=emb, vision_mask=vm)[-1] - want[0]).max() > 100 * _tol(want)  # not LLaMA


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_family_a_runtime_lacks_is_one_line(tmp_path, monkeypatch, backend):
    _register_toy(monkeypatch, runtimes=())
    config = tiny_config(text_model_type="toy", hidden_act="gelu_pytorch_tanh")
    path = write_checkpoint(tmp_path, config, random_tensors(config))
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    with pytest.raises(PmodError, match=f"the {'mlx' if backend == 'mlx' else 'torch'} runtime has no decoder "
                                        "for text model 'toy'"):
        pmod.open_engine(path, backend=backend, dtype="float32")


@pytest.mark.parametrize("d, message", [
    (dict(text_model_type="qwen9"), "'text_model_type' is 'qwen9', a text model pmod does not run: known llama"),
    (dict(model_type="llava_qwen"), "'text_model_type' is 'qwen'"),
    (dict(model_type="llava", text_config=dict(model_type="mistral")), "'text_model_type' is 'mistral'"),
    (dict(hidden_act="gelu"), "'hidden_act' must be 'silu' \\(llama\\)"),
    (dict(qkv_bias="yes"), "'qkv_bias' must be true or false"),
])
def test_unknown_family_or_bad_flag_is_one_line(d, message):
    base = tiny_config().to_dict()
    base.pop("text_model_type")
    with pytest.raises(PmodError, match=message):
        PmodConfig.from_dict({**base, **d})


def test_families_read_from_checkpoint_layouts():
    base = tiny_config().to_dict()
    base.pop("text_model_type")
    for d in (dict(model_type="pmod_llava_llama"), dict(model_type="llava_llama"),
              dict(model_type="llava_next", text_config=dict(model_type="llama")), {}):
        assert PmodConfig.from_dict({**base, **d}).text_model_type == "llama"
