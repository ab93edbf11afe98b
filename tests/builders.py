"""Tiny models for tests: configs, random weights, checkpoints, a transformers twin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pmod.config import PmodConfig
from pmod.format import expected_tensors, save_checkpoint

TINY = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    mod_target_layers="shiftedcos_decay_0.85_0.15",
    mod_router_factor=0.5,
    mod_weight_norm="tanh_0.2_1",
    mod_bias_enabled=True,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(**overrides) -> PmodConfig:
    """A 6-layer, hidden-32 p-MoD config (MoD layers 2..5 with the default schedule)."""
    return PmodConfig(**{**TINY, **overrides})


#: Dense (MoD off) ``tiny_config`` overrides checked against transformers' LLaMA.
DENSE_VARIANTS = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "tied": dict(tie_word_embeddings=True),
    "rope_linear": dict(rope_scaling={"type": "linear", "factor": 2.0}),
    "head_dim_theta": dict(head_dim=16, num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0),
}


def random_tensors(config: PmodConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every tensor of ``config``.

    Projections have std 1/sqrt(fan_in) (activations stay O(1)); the residual branches
    (o_proj, down_proj) are damped so the residual stream grows slowly; norms are near 1;
    router weights give scores of std ~1 (spread, tanh not saturated); lm_head gives
    logits of std ~1 so greedy argmax margins are clear.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_tensors(config).items():
        if name.endswith("layernorm.weight") or name == "language_model.norm.weight":
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("embed_tokens.weight"):
            a = rng.standard_normal(shape)
        elif name.endswith("router.weight"):
            a = rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif name.endswith("router.bias"):
            a = 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            a = 0.05 * rng.standard_normal(shape)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            a = 0.5 * rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif len(shape) == 2:
            a = rng.standard_normal(shape) / np.sqrt(shape[-1])
        else:
            a = 0.1 * rng.standard_normal(shape)
        out[name] = a.astype(np.float32)
    return out


def write_checkpoint(tmp_path, config: PmodConfig, tensors: dict, dtype: str = "float32",
                     name: str = "ckpt") -> Path:
    """Save a pmod checkpoint directory under ``tmp_path`` and return its path."""
    dst = Path(tmp_path) / name
    i = 0
    while dst.exists():
        i += 1
        dst = Path(tmp_path) / f"{name}{i}"
    return save_checkpoint(dst, config, tensors, dtype=dtype)


def tiny_next(max_position_embeddings: int, vision_layers: int = 3) -> dict:
    """``tiny_config`` overrides of a tiny LLaVA-NeXT p-MoD: a 28 px CLIP tower (2 x 2 patches
    of 14) of ``vision_layers`` layers, the LLaVA projector, anyres on a 1x2 / 2x1 / 2x2 grid."""
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=vision_layers, num_attention_heads=4,
                  image_size=28, patch_size=14, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu")
    return dict(vision_config=vision, mm_projector_type="mlp2x_gelu", mm_hidden_size=24,
                mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]], max_position_embeddings=max_position_embeddings)


def tiny_checkpoint(tmp_path, seed: int = 0, tokenizer: bool = False, **overrides):
    """``(config, tensors, path)``: ``tiny_config(**overrides)`` with ``random_tensors(seed)``
    saved in float32 by ``write_checkpoint``, with the tiny tokenizer if ``tokenizer``."""
    from tiny_tokenizer import write_tiny_tokenizer

    config = tiny_config(**overrides)
    tensors = random_tensors(config, seed=seed)
    path = write_checkpoint(tmp_path, config, tensors)
    if tokenizer:
        write_tiny_tokenizer(path, config.vocab_size)
    return config, tensors, path


def copy_dir(src, tmp_path, name: str) -> Path:
    """A copy of the directory ``src`` at ``tmp_path / name``, to break without touching ``src``."""
    dst = Path(tmp_path) / name
    shutil.copytree(src, dst)
    return dst


def edit_manifest(directory, fn) -> None:
    """Rewrite ``directory/manifest.json`` as ``fn`` edits it (in place)."""
    m = json.loads((Path(directory) / "manifest.json").read_text())
    fn(m)
    (Path(directory) / "manifest.json").write_text(json.dumps(m))


def hf_llama(config: PmodConfig, tensors: dict, dtype=None):
    """A transformers ``LlamaForCausalLM`` (eager attention) with the same weights.

    Routers are dropped: this is the dense model (equal to p-MoD when MoD is off or no
    vision tokens are routed). Skips the calling test where torch or transformers is missing.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = dtype or torch.float32
    c = config
    kw = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=c.attention_bias, mlp_bias=c.mlp_bias, hidden_act="silu",
        rope_theta=c.rope_theta, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )
    if c.rope_scaling is not None:
        kw["rope_scaling"] = dict(c.rope_scaling)
    hcfg = LlamaConfig(**kw)
    hcfg._attn_implementation = "eager"
    model = LlamaForCausalLM(hcfg)
    sd = {}
    for name, arr in tensors.items():
        if ".router." in name or not name.startswith("language_model."):
            continue
        hname = "lm_head.weight" if name == "language_model.lm_head.weight" \
            else "model." + name[len("language_model."):]
        sd[hname] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if c.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model.to(dtype).eval()


def hf_run(model, input_ids=None, inputs_embeds=None, n_decode: int = 0):
    """Prefill (all-position logits [T,V]) then ``n_decode`` greedy steps with HF's cache.

    Returns (prefill_logits, decode_tokens, decode_logits) as float64 numpy; decode_tokens
    has the greedy token fed at each step (the first is argmax of the last prefill logits).
    """
    import torch

    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        if input_ids is not None:
            out = model(input_ids=torch.as_tensor(np.asarray(input_ids).reshape(1, -1), dtype=torch.long),
                        use_cache=True)
        else:
            e = torch.as_tensor(np.asarray(inputs_embeds).reshape(1, -1, model.config.hidden_size)).to(dtype)
            out = model(inputs_embeds=e, use_cache=True)
        logits = out.logits[0].double().numpy()
        past = out.past_key_values
        T = logits.shape[0]
        toks, steps = [int(np.argmax(logits[-1]))], []
        for i in range(n_decode):
            o = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True,
                      position_ids=torch.tensor([[T + i]]))
            past = o.past_key_values
            steps.append(o.logits[0, -1].double().numpy())
            toks.append(int(np.argmax(steps[-1])))
    steps = np.array(steps) if steps else np.zeros((0, logits.shape[1]))
    return logits, toks[:n_decode], steps


def vision_inputs(tensors: dict, ids, vision_mask, seed: int = 0, scale: float = 1.0):
    """Token embeddings of ``ids`` with random 'image feature' rows at vision positions."""
    emb = np.asarray(tensors["language_model.embed_tokens.weight"], dtype=np.float32)[np.asarray(ids)]
    vm = np.asarray(vision_mask, dtype=bool)
    rng = np.random.default_rng(1000 + seed)
    emb = emb.copy()
    emb[vm] = (scale * rng.standard_normal((int(vm.sum()), emb.shape[1]))).astype(np.float32)
    return emb
