"""The LLaMA decoder with p-MoD layers in static-capacity form (torch), the graph that is exported.

Why a second form of the decoder
--------------------------------
The dynamic model (``pmod_mlx.language``) gives a MoD layer ``T - n + k`` tokens, where
``n`` (vision tokens in the chunk) is data. A TensorRT engine needs shapes that follow
from input *shapes* only, so this form fixes them with a declared maximum ``N``:

* A chunk arrives already split (``pmod.chunk``) into a **text stream** (the
  ``Tt`` tokens MoD layers never route, a dynamic dimension) and a **vision stream** of
  exactly ``N`` slots, the first ``n`` real (in prompt order), the rest padding.
  Positions come with each stream, so slot order never matters: attention is causal by
  *position* (key position <= query position), never by slot index.
* A dense layer runs all ``Tt + N`` slots; padding slots are masked as keys.
* MoD layer ``l`` ranks the vision slots by router logit (padding at ``PAD_SCORE``) and takes
  the top ``C_l = pmod.schedule.capacities(config, N, retention)[l]`` (``retention``: the
  dial the graph is built at, 1 by default) with one TopK whose K is the
  constant ``C_l``; slot ``j`` of the selection is live iff ``j < k``, ``k =
  kept_count(n, r_l)`` read from a constant table built with ``pmod.schedule.kept_count``
  (no ratio arithmetic in the graph, so TensorRT's reduced precision cannot change a
  count). The layer runs ``Tt + C_l`` slots; dead slots are masked as keys and their
  outputs replaced by the skip value ``w * x``, so the result is the dynamic model's.
* Ties: the eager path uses a stable descending sort, the exported TopK is ONNX's
  (equal values: the lower index first); both keep the lower prompt index, as MLX does.
  If ``C_l`` exceeds TensorRT's TopK limit the selection is split into TopKs of at most
  ``TOPK_MAX`` (each masking out what the earlier ones took), which selects the same set
  in the same order.

Per layer the graph returns the new KV entries of its ``S_l`` slots (``Tt + N`` or
``Tt + C_l``) in the order ``[text, vision]``. The live ones always come first (text,
then the ``n`` real vision slots, or the ``k`` kept ones), so a runtime appends the slots
and advances the layer's length by ``Tt + k_l``: the cache then holds exactly the kept
tokens, as in the dynamic model; the dead tail is overwritten by the next chunk.

Layer semantics (as ``pmod_mlx.language``): router logit ``s = router(x)`` (float32),
weight ``w = scale * f(s) + bias``; kept vision token ``h + w * mlp(norm(h))``, skipped
vision token ``w * x``, text token a plain layer; original RoPE positions.
"""

from __future__ import annotations

from . import torch_loader  # noqa: F401  (imports torch; before it, see there)

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pmod.config import PmodConfig
from pmod.schedule import capacities, kept_count, layer_ratios

#: TensorRT's TopK limit: "k <= 3840" (TensorRT 10 operator reference, TopK,
#: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/operators/TopK.html).
TOPK_MAX = 3840

#: Router score of a padding slot: below every real score, above the -inf that a split
#: selection gives to what it has already taken (so no slot is ever taken twice).
PAD_SCORE = float(np.finfo(np.float32).min)

WEIGHT_FNS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": lambda s: s}


def exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dims))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype != torch.float32 else x  # accumulate in float32, as MLX does
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


def rope_tables(config: PmodConfig, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[max_context, head_dim]`` (rotate-half layout), computed in float64."""
    D = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D)
    pos = np.arange(max_context, dtype=np.float64)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        pos = pos / float(scaling["factor"])
    freqs = pos[:, None] * inv_freq[None]
    emb = np.concatenate([freqs, freqs], axis=-1)
    return torch.from_numpy(np.cos(emb)).float(), torch.from_numpy(np.sin(emb)).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` on ``x`` ``[1, S, heads, D]``, tables ``[1, S, 1, D]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: PmodConfig):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        bias = config.attention_bias
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * D, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv * D, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=bias)

    def forward(self, x, cos, sin, pos, live, past_k, past_v, past_pos):
        """Attend slots ``x`` ``[1, S, H]`` over the past entries and the live slots.

        ``pos`` int32 ``[1, S]``, ``live`` bool ``[1, S]``; past ``[1, P, n_kv, D]`` and
        ``[1, P]`` (all live). Returns the output and the slots' post-RoPE K and V.
        """
        nkv, g, D = self.n_kv, self.n_heads // self.n_kv, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(1, -1, self.n_heads, D), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(1, -1, nkv, D), cos, sin)
        v = self.v_proj(x).reshape(1, -1, nkv, D)
        keys = torch.cat([past_k, k], dim=1)  # [1, P+S, nkv, D]
        values = torch.cat([past_v, v], dim=1)
        key_pos = torch.cat([past_pos, pos], dim=1)  # [1, P+S]
        key_live = torch.cat([torch.ones_like(past_pos, dtype=torch.bool), live], dim=1)
        allowed = (key_pos.unsqueeze(1) <= pos.unsqueeze(2)) & key_live.unsqueeze(1)  # [1, S, P+S]
        if not exporting():
            # Eager: torch's fused attention (about 4x the matmul-softmax-matmul below on a
            # CPU). A dead query slot may see every key, so that no row is empty; its output
            # is discarded. Live slots always see themselves.
            mask = (allowed | ~live.unsqueeze(2)).unsqueeze(1)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), keys.transpose(1, 2).repeat_interleave(g, dim=1),
                values.transpose(1, 2).repeat_interleave(g, dim=1), attn_mask=mask)
            return self.o_proj(out.transpose(1, 2).reshape(1, -1, self.n_heads * D)), k, v
        qh = (q * D**-0.5).reshape(1, -1, nkv, g, D).permute(0, 2, 3, 1, 4)  # [1, nkv, g, S, D]
        scores = torch.matmul(qh, keys.permute(0, 2, 3, 1).unsqueeze(2)).float()  # [1, nkv, g, S, P+S]
        # A finite floor, not -inf: a dead slot with no allowed key gets uniform weights, not NaN.
        scores = torch.where(allowed[:, None, None], scores, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1).to(x.dtype)
        out = torch.matmul(probs, values.permute(0, 2, 1, 3).unsqueeze(2))  # [1, nkv, g, S, D]
        out = out.permute(0, 3, 1, 2, 4).reshape(1, -1, self.n_heads * D)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, config: PmodConfig):
        super().__init__()
        H, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A LLaMA layer; with a ``ratio`` it is a MoD layer and owns a router."""

    def __init__(self, config: PmodConfig, ratio: float | None):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ratio = ratio
        if ratio is not None:
            self.router = nn.Linear(config.hidden_size, 1, bias=config.mod_bias_enabled)
            kind, self.w_scale, self.w_bias = config.weight_norm
            self.w_fn = WEIGHT_FNS[kind]

    def block(self, x, cos, sin, pos, live, past):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, pos, live, *past)
        h = x + a
        return h, self.mlp(self.post_attention_layernorm(h)), k, v

    def route(self, x_v):
        """Router logits ``s`` (float32) and weights ``w`` ``[1, N]`` of the vision slots."""
        s = self.router(x_v)[..., 0].float()
        return s, self.w_scale * self.w_fn(s) + self.w_bias


class LanguageModel(nn.Module):
    """Weights of the decoder (names as in the pmod format under ``language_model.``)."""

    def __init__(self, config: PmodConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, r) for r in layer_ratios(config)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight


class Embed(nn.Module):
    """``input_ids`` int32 ``[1, T]`` -> ``inputs_embeds`` ``[1, T, H]`` (the ``embed`` graph)."""

    def __init__(self, lm: LanguageModel):
        super().__init__()
        self.embed_tokens = lm.embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens.weight[input_ids]


def select_top(key: torch.Tensor, count: int) -> torch.Tensor:
    """Indices int32 ``[1, count]`` of the ``count`` largest entries of ``key`` ``[1, N]``.

    Descending, equal values in index order. Exported as TopKs with constant K of at most
    ``TOPK_MAX`` each; eagerly a stable sort (``torch.topk`` does not promise the tie order).
    Entries of ``key`` must be above -inf (padding uses ``PAD_SCORE``).
    """
    if not exporting():
        return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :count].to(torch.int32)
    parts, taken = [], 0
    while taken < count:
        take = min(count - taken, TOPK_MAX)
        idx = torch.topk(key, take, dim=-1).indices.to(torch.int32)  # ONNX TopK: ties -> lower index
        parts.append(idx)
        taken += take
        if taken < count:  # what this stage took cannot be taken again
            key = key.scatter(1, idx.long(), float("-inf"))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def gather_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (int32 ``[1, C]``) of ``x`` ``[1, N, ...]`` along dim 1."""
    return torch.index_select(x, 1, idx[0])


def scatter_slots(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x`` ``[1, N, H]`` with rows ``idx`` (distinct, int32 ``[1, C]``) replaced by ``rows``.

    The int64 cast is the last op before the scatter, so the exporter's Cast can be dropped
    (``pmod_export.onnx_export.narrow_index_casts``): ScatterElements takes int32 indices.
    Eagerly the rows are written in place, saving a copy of ``x``: the caller passes a
    temporary.
    """
    if not exporting():
        return x.index_copy_(1, idx[0].long(), rows)
    index = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]).long()
    return x.scatter(1, index, rows)


class StaticDecoder(nn.Module):
    """The static-capacity decoder for at most ``max_vision`` routed vision tokens per chunk.

    ``max_vision = 0`` is the text graph (decode, and chunks without vision tokens): every
    layer is a plain layer over the text stream.

    ``forward(text_embeds, text_positions, [vision_embeds, vision_positions, n_vision],
    past_key_0, past_value_0, past_positions_0, ...)`` returns ``logits`` float32 ``[1, V]``
    of the chunk's last position, then per layer ``new_key``, ``new_value`` ``[1, S_l, n_kv,
    D]`` and ``new_positions`` int32 ``[1, S_l]`` (graph names: docs/EXPORT.md).
    """

    def __init__(self, lm: LanguageModel, max_vision: int, max_context: int, retention: float = 1.0):
        """``retention``: the dial scaling every MoD layer's ratio (``pmod.schedule``), fixed at build time."""
        super().__init__()
        config = lm.config
        self.lm = lm
        self.N = int(max_vision)
        self.ratios = layer_ratios(config, retention)
        self.capacities = capacities(config, self.N, retention)  # C_l: the only place they come from
        cos, sin = rope_tables(config, max_context)
        dtype = lm.norm.weight.dtype
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)
        if self.N:
            for l, r in enumerate(self.ratios):
                if r is not None:
                    table = [kept_count(n, r) for n in range(self.N + 1)]
                    self.register_buffer(f"kept_{l}", torch.tensor(table, dtype=torch.int32), persistent=False)

    def slot_counts(self, text_len: int) -> list[int]:
        """``S_l``: KV slots each layer returns for a chunk of ``text_len`` text tokens."""
        return [text_len + c for c in self.capacities]  # dense layers: C_l = N

    def _tables(self, pos):
        return self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2)  # [1, S, 1, D]

    def forward(self, text_embeds, text_positions, *rest):
        N = self.N
        if N:
            vision_embeds, vision_positions, n_vision, *past = rest
            live_v = torch.arange(N, dtype=torch.int32).unsqueeze(0) < n_vision.unsqueeze(1)  # [1, N]
        else:
            past = rest
        x_t, pos_t = text_embeds, text_positions
        live_t = torch.ones_like(pos_t, dtype=torch.bool)
        new = []
        for l, layer in enumerate(self.lm.layers):
            past_l = past[3 * l: 3 * l + 3]
            if not N:
                h, m, k, v = layer.block(x_t, *self._tables(pos_t), pos_t, live_t, past_l)
                x_t = h + m
                new += [k, v, pos_t]
                continue
            if layer.ratio is None:
                x = torch.cat([x_t, vision_embeds], dim=1)
                pos = torch.cat([pos_t, vision_positions], dim=1)
                h, m, k, v = layer.block(x, *self._tables(pos), pos, torch.cat([live_t, live_v], dim=1), past_l)
                out = h + m
                x_t, vision_embeds = out[:, :x_t.shape[1]], out[:, x_t.shape[1]:]
                new += [k, v, pos]
                continue
            x_v = vision_embeds
            s, w = layer.route(x_v)
            skip = w.unsqueeze(-1).to(x_v.dtype) * x_v  # a skipped vision token leaves as w * x
            C = self.capacities[l]
            if C == 0:  # this layer keeps no vision token for any n <= N
                h, m, k, v = layer.block(x_t, *self._tables(pos_t), pos_t, live_t, past_l)
                x_t, vision_embeds = h + m, skip
                new += [k, v, pos_t]
                continue
            idx = select_top(torch.where(live_v, s, PAD_SCORE), C)  # [1, C] int32
            k_true = getattr(self, f"kept_{l}")[n_vision]  # [1] int32: kept_count(n, r_l)
            live_sel = torch.arange(C, dtype=torch.int32).unsqueeze(0) < k_true.unsqueeze(1)  # [1, C]
            x = torch.cat([x_t, gather_slots(x_v, idx)], dim=1)
            pos = torch.cat([pos_t, gather_slots(vision_positions, idx)], dim=1)
            h, m, k, v = layer.block(x, *self._tables(pos), pos, torch.cat([live_t, live_sel], dim=1), past_l)
            gate = torch.cat([torch.ones_like(x_t[..., 0]), gather_slots(w.to(x_t.dtype), idx)], dim=1)
            out = h + gate.unsqueeze(-1) * m
            Tt = x_t.shape[1]
            kept = torch.where(live_sel.unsqueeze(-1), out[:, Tt:], gather_slots(skip, idx))
            x_t, vision_embeds = out[:, :Tt], scatter_slots(skip, idx, kept)
            new += [k, v, pos]
        if N:
            h_all = torch.cat([x_t, vision_embeds], dim=1)
            pos_all = torch.cat([pos_t, torch.where(live_v, vision_positions, -1)], dim=1)
        else:
            h_all, pos_all = x_t, pos_t
        # The chunk's last position, wherever its slot is: one-hot of the largest live position.
        pf = pos_all.float()
        last = (pf == pf.max(dim=1, keepdim=True).values).to(h_all.dtype)  # [1, S]
        h_last = torch.matmul(last.unsqueeze(1), h_all)  # [1, 1, H]
        logits = torch.matmul(self.lm.norm(h_last), self.lm.output_weight().t()).float()
        return (logits.reshape(1, -1), *new)
