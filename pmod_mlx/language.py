"""The LLaMA decoder with p-MoD layers, in the style of mlx-lm's ``models/llama.py``.

A MoD layer routes the chunk's vision tokens (``vision_mask``): router logit
``s = router(x)``, weight ``w = scale * f(s) + bias`` (TanhNorm ``0.2*tanh(s)+1``),
keep the top ``k = trunc(n * r_l)`` vision tokens by ``s`` (ties to the lower index;
``pmod.schedule`` gives ``k``). Kept tokens (all text + kept vision) run through the
layer in their original order at their original RoPE positions; kept vision tokens
become ``h + w * mlp(norm(h))``, skipped vision tokens ``w * x`` (STRing), text tokens
are a normal layer. A chunk without vision tokens (e.g. decoding) is a plain layer over
the layer's own cache.

Difference from the official code: it ranks the normalised weights of all tokens with
text tokens set to ``-inf`` logits, so a vision token whose ``tanh`` saturates at
``w = 0.8`` ties with text tokens and may lose its slot to one. pmod ranks vision
tokens only, by the logit ``s`` (same order wherever ``tanh`` does not saturate).

The routing and the merge run as Metal kernels where Metal is present, their MLX twins
elsewhere (``pmod_mlx.kernels``).
"""

from __future__ import annotations

import threading

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pmod.architectures import runtime_entry
from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.schedule import kept_count, layer_ratios

from . import kernels
from .cache import LayerKVCache, make_cache


@dataclass
class Rope:
    """cos/sin tables ``[B or 1, T, head_dim]`` (rotate-half layout) for a chunk's positions."""

    cos: mx.array
    sin: mx.array
    positions: mx.array  # [B or 1, T]

    def take(self, idx: mx.array) -> "Rope":
        """The rows of the kept tokens, ``idx`` ``[B, n]``."""
        if self.cos.shape[0] != idx.shape[0]:
            return Rope(self.cos[0][idx], self.sin[0][idx], self.positions[0][idx])
        return Rope(mx.take_along_axis(self.cos, idx[..., None], axis=1),
                    mx.take_along_axis(self.sin, idx[..., None], axis=1),
                    mx.take_along_axis(self.positions, idx, axis=1))


def rope_tables(config: PmodConfig, positions: mx.array) -> Rope:
    """Tables for ``positions`` ``[T]`` (shared by the batch) or ``[B, T]``."""
    positions = positions if positions.ndim == 2 else positions[None]
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (mx.arange(0, D, 2, dtype=mx.float32) / D))
    pos = positions.astype(mx.float32)
    if config.rope_scaling and config.rope_scaling.get("rope_type", config.rope_scaling.get("type")) == "linear":
        pos = pos / config.rope_scaling["factor"]
    freqs = pos[..., None] * inv_freq
    emb = mx.concatenate([freqs, freqs], axis=-1)
    return Rope(mx.cos(emb), mx.sin(emb), positions)


def apply_rope(x: mx.array, rope: Rope) -> mx.array:
    """HF LLaMA rotary embedding ``x * cos + rotate_half(x) * sin`` on ``x`` ``[B, H, T, D]``."""
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * rope.cos[:, None] + rotated * rope.sin[:, None]).astype(x.dtype)


@dataclass
class Routing:
    """Where a chunk's vision tokens are (every row of a batch has the same count)."""

    n_vision: int
    vision_idx: mx.array  # [B, n] int32, in increasing order
    is_vision: mx.array  # [B, T] bool

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> "Routing | None":
        mask = np.asarray(mask, dtype=bool)
        counts = mask.sum(axis=1)
        if not counts.any():
            return None
        if (counts != counts[0]).any():
            raise PmodError(f"every row of a batch needs the same number of vision tokens, got {counts.tolist()}")
        order = np.argsort(~mask, axis=1, kind="stable").astype(np.int32)  # vision first, in order
        n = int(counts[0])
        return cls(n, mx.array(order[:, :n]), mx.array(mask))


class Attention(nn.Module):
    def __init__(self, config: PmodConfig):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        self.scale = D**-0.5
        bias = config.qkv_bias
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=config.o_bias)

    def __call__(self, x: mx.array, rope: Rope, cache: LayerKVCache | None) -> mx.array:
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        mask = None
        if cache is not None:
            k, v = cache.update_and_fetch(k, v, rope.positions.reshape(-1))
            mask = cache.mask
        out = causal_attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


#: Query block of ``causal_attention`` on the CPU.
CPU_QUERY_BLOCK = 256


def causal_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None) -> mx.array:
    """Attention of a chunk's queries ``[B, h, T, D]`` over keys ``[B, kv, S, D]`` (``S >= T``:
    the cache, then the chunk) with the bottom-right aligned causal mask: cached positions all
    precede the chunk's and both are in increasing order, so "key position <= query position"
    is that mask. ``mask`` (one query, ``T == 1``): bool ``[B, 1, 1, S]``, the keys each row
    sees (a padded decode batch, ``pmod_mlx.batch``); None: all.

    MLX's CPU backend computes the masked attention as the full ``T x S`` score matrix,
    softmax included, and its elementwise ops are slow there and run on one thread; in query
    blocks, the keys past a block's last query are never scored, which about halves the work
    of a long prefill, and the blocks alternate between two CPU streams, which MLX runs on
    two threads (about 25% less time on 2 cores; the result is the same). Metal's fused
    kernel needs no such help."""
    T, S = q.shape[2], k.shape[2]
    if T == 1:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    if T <= CPU_QUERY_BLOCK or mx.default_device() != mx.cpu:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    outs = []
    for i, start in enumerate(range(0, T, CPU_QUERY_BLOCK)):
        end = min(start + CPU_QUERY_BLOCK, T)
        keys = S - T + end
        with mx.stream(_cpu_streams()[i % 2]):
            outs.append(mx.fast.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :keys], v[:, :, :keys],
                                                             scale=scale, mask="causal"))
    return mx.concatenate(outs, axis=2)


_STREAMS = threading.local()  # MLX streams belong to the thread that made them


def _cpu_streams() -> list:
    """This thread's default CPU stream and a second one, made once per thread."""
    if not hasattr(_STREAMS, "pair"):
        _STREAMS.pair = [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)]
    return _STREAMS.pair


class MLP(nn.Module):
    def __init__(self, config: PmodConfig):
        super().__init__()
        H, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


#: text family (``pmod.architectures``) -> (attention, MLP) classes; norms and routing are shared
FAMILIES: dict[str, tuple[type, type]] = {"llama": (Attention, MLP)}


class DecoderLayer(nn.Module):
    """A decoder layer of the config's text family; with a ``ratio`` it is a MoD layer and owns a router."""

    def __init__(self, config: PmodConfig, ratio: float | None):
        super().__init__()
        attention, mlp = runtime_entry(FAMILIES, config, "mlx")
        self.self_attn = attention(config)
        self.mlp = mlp(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ratio = ratio
        if ratio is not None:
            self.router = nn.Linear(config.hidden_size, 1, bias=config.mod_bias_enabled)
            self.w_kind, self.w_scale, self.w_bias = config.weight_norm

    def _block(self, x: mx.array, rope: Rope, cache, probe=None):
        h = x + self.self_attn(self.input_layernorm(x), rope, cache)
        if probe is not None:
            probe.mark("attention", h)
        m = self.mlp(self.post_attention_layernorm(h))
        if probe is not None:
            probe.mark("mlp", m)
        return h, m

    def __call__(self, x: mx.array, rope: Rope, cache, routing: Routing | None, probe=None) -> mx.array:
        """``probe``: the language model's (:attr:`LanguageModel.probe`), called at section boundaries."""
        if self.ratio is None or routing is None:
            h, m = self._block(x, rope, cache, probe)
            return h + m
        s = self.router(x)[..., 0].astype(mx.float32)  # [B, T]
        k = kept_count(routing.n_vision, self.ratio)
        # gate: w on vision tokens, 1 on text; keep: the text and top-k vision positions in
        # order (ties to the lower index); slot: each token's row in keep (-1: skipped). The
        # selection passes no gradient; the router learns through w, on kept and skipped tokens.
        gate, keep, slot = kernels.route(s, routing.is_vision, routing.vision_idx, k,
                                         (self.w_kind, self.w_scale, self.w_bias), x.dtype)
        if keep.shape[1] == 0:
            return gate[..., None] * x  # an all-vision chunk of which this layer keeps nothing
        x_keep, rope_keep = mx.take_along_axis(x, keep[..., None], axis=1), rope.take(keep)
        if probe is not None:
            probe.mark("route", gate, slot, x_keep, rope_keep.cos, rope_keep.sin, rope_keep.positions)
        h, m = self._block(x_keep, rope_keep, cache, probe)
        return kernels.merge(x, h, m, gate, keep, slot)  # kept: h + gate * m; skipped: gate * x


class LanguageModel(nn.Module):
    def __init__(self, config: PmodConfig, retention: float = 1.0):
        """``retention``: the runtime dial that scales every MoD layer's ratio (``pmod.schedule``)."""
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, r) for r in layer_ratios(config, retention)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        #: A ``pmod.engine.LayerProbe`` the forward pass calls at section boundaries (``enter`` /
        #: ``mark`` with the arrays at hand): ``MLXEngine.profiled`` sets a timer here for
        #: ``pmod bench --profile``, the shapes trainer one that keeps a layer's input for its
        #: binding loss. None, as always otherwise, costs one check per section.
        self.probe = None

    def make_cache(self) -> list[LayerKVCache]:
        return make_cache(len(self.layers))

    def __call__(self, inputs: mx.array | None = None, cache: list | None = None,
                 inputs_embeds: mx.array | None = None, vision_mask=None,
                 last_only: bool = False) -> mx.array:
        """Logits ``[1, T, V]`` (``[1, 1, V]`` with ``last_only``) for a chunk of tokens."""
        h = self.embed_tokens(inputs) if inputs_embeds is None else inputs_embeds
        if h.ndim != 3 or (cache and h.shape[0] != 1):
            raise PmodError(f"batch size 1 only with a cache: got input of shape {list(h.shape)}")
        B, T = h.shape[:2]
        routing = None
        if vision_mask is not None:
            mask = np.asarray(vision_mask).reshape(B, -1)
            if mask.shape[1] != T:
                raise PmodError(f"vision_mask has {mask.shape[1]} entries for {T} tokens")
            routing = Routing.from_mask(mask)
        offset = cache[0].offset if cache else 0
        rope = rope_tables(self.config, mx.arange(offset, offset + T, dtype=mx.int32))
        cache = cache or [None] * len(self.layers)
        probe = self.probe
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            if probe is not None:
                probe.enter(i, h)
            h = layer(h, rope, c, routing, probe)
            if c is not None:
                c.advance(T)
        if probe is not None:
            probe.enter(None, h)
        if last_only:
            h = h[:, -1:]
        return self.logits(h)

    def logits(self, h: mx.array) -> mx.array:
        """The final norm and the LM head (or the tied embeddings) over hidden states ``h``."""
        h = self.norm(h)
        if self.config.tie_word_embeddings:
            return self.embed_tokens.as_linear(h)
        return self.lm_head(h)
