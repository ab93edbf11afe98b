"""The LLaMA decoder with p-MoD layers in the static form (torch): the graphs that are exported.

Why a second form of the decoder
--------------------------------
The dynamic model (``pmod_mlx.language``) gives a MoD layer ``T - n + k`` tokens, where
``n`` (vision tokens in the chunk) is data. An exported graph (TensorRT above all) needs
shapes that follow from its input *shapes*, so the host hands it the chunk already split
(:mod:`pmod.static.chunk`) into a **text stream** (the ``Tt`` tokens MoD layers never route)
and a **vision stream**, each with its RoPE positions; attention is causal by *position*
(key position <= query position), so slot order never matters. Three forms:

* ``text`` (the ``decode`` graph): every layer a plain layer over the text stream.
* ``shape`` (the ``prefill`` graph): the vision stream is exactly the ``n`` routed tokens
  (a dynamic dimension bounded by the export's ``N``). Dense layers run ``Tt + n`` tokens.
  MoD layer ``l`` ranks the vision tokens by router logit and takes a TopK whose K is the
  length of a carrier input ``keep_l_s`` that the host sized to ``kept_count(n, r_l)``
  (``pmod.schedule``): no ratio arithmetic happens in the graph, so reduced precision
  cannot change a count, and the layer runs ``Tt + k_l`` tokens, all live.
* ``bucket`` (``prefill_B`` graphs, for targets that want a constant K): ``B`` vision
  slots, the first ``n`` real (``n_vision``), padding ranked last (``PAD_SCORE``); MoD layer
  ``l`` takes the constant ``C_l = capacities(config, B)[l]`` and slot ``j`` of the
  selection is live iff ``j < kept_count(n, r_l)`` (a constant table). Dead slots are masked
  as keys and their outputs replaced by the skip value; dead rows are zeroed after dense
  layers, so nothing non-finite can leak from them.

A selection above TensorRT's TopK limit is split into stages of at most ``TOPK_STAGE``
(``pmod.static.contract``), each after setting what the earlier ones took to ``-inf``: the
same set in the same order. Ties keep the lower prompt index, as MLX does: eagerly through a
stable sort, in the graph through ONNX TopK's rule.

Per layer the graph returns the new KV entries of its ``S_l`` slots in the order ``[text,
vision]``; the live ones come first, so a runtime keeps ``Tt + k_l`` of them. Layer
semantics (as ``pmod_mlx.language``): router logit ``s = router(x)`` computed in float32
(a float32 matmul, whatever the export dtype), weight ``w = scale * f(s) + bias``; kept vision
token ``h + w * mlp(norm(h))``, skipped vision token ``w * x``, text token a plain layer.

Attention is written per ``target`` (docs/EXPORT.md): eagerly torch's fused
``scaled_dot_product_attention``; ``ort`` ONNX Runtime's fused ``com.microsoft``
``MultiHeadAttention`` with an additive bias; ``trt`` the plain MatMul-Softmax-MatMul in the
4-D layout TensorRT fuses. The last position's logits come from a Gather at the ArgMax of the
live positions (a one-hot MatMul would turn an inf anywhere into NaN).
"""

from __future__ import annotations

from . import torch_loader  # noqa: F401  (imports torch; before it, see there)

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pmod.architectures import runtime_entry
from pmod.config import PmodConfig
from pmod.schedule import capacities, kept_count, layer_ratios
from pmod.static.contract import layer_stages, stage_sizes, topk_stages

#: Router score of a padding slot: below every real score, above the -inf that a split
#: selection gives to what it has already taken (so no slot is ever taken twice).
PAD_SCORE = float(np.finfo(np.float32).min)

WEIGHT_FNS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": lambda s: s}
FORMS = ("text", "shape", "bucket")


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


def merge_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    """``[1, S, heads, D]`` -> ``[1, S, width = heads * D]``, the width a Python int: ONNX Runtime's
    Reshape cannot infer a ``-1`` for an empty tensor (a MoD layer may get no token at all)."""
    return x.reshape(1, x.shape[1], width)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[1, L, n_kv, D]`` -> ``[1, L, n_kv * groups, D]``, each KV head serving ``groups`` query heads."""
    if groups == 1:
        return x
    _, L, n_kv, D = x.shape
    # explicit sizes, no -1: ONNX Runtime's Reshape cannot infer one for an empty past
    return x.unsqueeze(3).expand(-1, -1, -1, groups, -1).reshape(1, L, n_kv * groups, D)


class _MultiHeadAttention(torch.autograd.Function):
    """ONNX Runtime's ``com.microsoft.MultiHeadAttention`` (query ``[1, S, H*D]``, key/value
    ``[1, L, H*D]``, additive ``attention_bias`` ``[1, 1, S, L]``); eagerly the same by sdpa.

    The symbolic passes the bias as the fourth input; ``pmod_export.onnx_export`` moves it to
    the op's sixth slot (``bias`` and ``key_padding_mask`` left empty), which the TorchScript
    exporter cannot write itself.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, heads: int):
        S, L = q.shape[1], k.shape[1]
        split = lambda t, n: t.reshape(1, n, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q, S), split(k, L), split(v, L), attn_mask=bias)
        return out.transpose(1, 2).flatten(2)

    @staticmethod
    def symbolic(g, q, k, v, bias, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, bias, num_heads_i=heads)
        out.setType(q.type())
        return out


#: Query blocks of :func:`blocked_attention`. ONNX Runtime's CPU MultiHeadAttention with a
#: bias materialises every score, so cutting a causal chunk into blocks that each see only the
#: keys up to their end saves most of the masked half (2944 tokens, 8 heads, 2 CPU threads:
#: 178 ms in one call, 115 / 77 / 63 ms in 2 / 4 / 8 blocks).
QUERY_BLOCKS = 8


def blocked_attention(q, k, v, past_k, past_v, past_pos, pos, heads: int, head_dim: int):
    """Causal-by-position attention of a chunk as ``QUERY_BLOCKS`` fused MultiHeadAttention calls.

    The chunk's slots are put in position order (a TopK over the positions), so query block
    ``i`` sees every past entry (all before the chunk) and the chunk's keys up to its own end;
    a bias masks the rest of its last block. Outputs go back to slot order. ``q``, ``k``, ``v``
    ``[1, S, heads, D]`` (KV heads already repeated), past ``[1, P, heads, D]``; returns
    ``[1, S, heads * D]``.
    """
    S = q.shape[1]
    order = torch.topk(pos.float(), S, dim=1, largest=False).indices[0].to(torch.int32)  # positions < 2**24
    q, k, v, pos = (torch.index_select(t, 1, order) for t in (q, k, v, pos))
    keys, values, key_pos = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1), torch.cat([past_pos, pos], 1)
    step = (S + QUERY_BLOCKS - 1) // QUERY_BLOCKS
    P = past_pos.shape[1]
    outs = []
    for i in range(QUERY_BLOCKS):
        # keys this block may see; none for a block past the chunk's end (its queries are empty)
        end = torch.where(i * step < S, P + torch.clamp((i + 1) * step, max=S), 0)
        qb, pb = q[:, i * step:(i + 1) * step], pos[:, i * step:(i + 1) * step]
        allowed = key_pos[:, :end].unsqueeze(1) <= pb.unsqueeze(2)
        bias = torch.where(allowed, 0.0, torch.finfo(q.dtype).min).to(q.dtype).unsqueeze(1)
        w = heads * head_dim
        outs.append(_MultiHeadAttention.apply(merge_heads(qb, w), merge_heads(keys[:, :end], w),
                                              merge_heads(values[:, :end], w), bias, heads))
    back = torch.topk(order.float(), S, largest=False).indices.to(torch.int32)  # the inverse permutation
    return torch.index_select(torch.cat(outs, 1), 1, back)


def eager_attention(q, k, v, window, pos, live, order):
    """Attention of the slots ``q, k, v`` ``[1, S, heads or kv, D]`` over the past and themselves,
    causal by position, with torch's fused kernels (what the torch backend runs).

    ``window``: views of the layer's KV buffers, keys and values ``[1, P+S, n_kv, D]`` and
    positions ``[1, P+S]``, holding the ``P`` past entries and then room for the chunk's ``S``
    slots. The slots' entries are written there first and attention reads the window in
    place, so a decode step copies one entry per layer instead of concatenating (copying) the
    whole cache each step, as a ``torch.cat`` of past and new would.

    A first chunk with every slot live (a prompt's prefill, dense or MoD) is put in position
    order (``order``: :func:`position_order` of its slots, None where they are in it already),
    where "key position <= query position" is the plain causal mask: the kernel then skips the
    masked half (as transformers' sdpa path does) and no mask is built. One query (decoding)
    sees every key, so it needs no mask either. Anything else gets the position mask.
    Returns ``[1, S, heads * D]`` in slot order.
    """
    keys, values, key_pos = window
    S, g = q.shape[1], q.shape[2] // k.shape[2]
    P = keys.shape[1] - S
    keys[:, P:].copy_(k)
    values[:, P:].copy_(v)
    key_pos[:, P:].copy_(pos)
    if live is None and P == 0 and S > 1:
        if order is not None:
            q, k, v = q[:, order[0]], k[:, order[0]], v[:, order[0]]
        k, v = repeat_kv(k, g), repeat_kv(v, g)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        out = out.transpose(1, 2)
        return (out if order is None else out[:, order[1]]).flatten(2)
    keys, values = repeat_kv(keys, g), repeat_kv(values, g)
    mask = None if live is None and S == 1 else position_mask(key_pos[:, :P], pos, live).unsqueeze(1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


def position_order(pos) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(order, back)``: the permutation that puts slots ``pos`` ``[1, S]`` in position order and
    its inverse, for :func:`eager_attention`; computed once per set of slots (a chunk's dense
    layers share theirs), and never in an export."""
    if exporting() or pos.shape[1] < 2:
        return None
    order = torch.argsort(pos[0])
    return order, torch.argsort(order)


def position_mask(past_pos, pos, live):
    """``[1, S, P+S]`` bool: slot query ``i`` may see key ``j`` (key position <= query position,
    past entries all live; a dead query sees every key, so no row is empty: it is dropped later)."""
    allowed = torch.cat([past_pos, pos], dim=1).unsqueeze(1) <= pos.unsqueeze(2)
    if live is not None:
        allowed = allowed & torch.cat([torch.ones_like(past_pos, dtype=torch.bool), live], dim=1).unsqueeze(1)
        allowed = allowed | ~live.unsqueeze(2)
    return allowed


class Attention(nn.Module):
    def __init__(self, config: PmodConfig):
        super().__init__()
        H, D = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, D
        bias = config.qkv_bias
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=bias)
        self.k_proj = nn.Linear(H, self.n_kv * D, bias=bias)
        self.v_proj = nn.Linear(H, self.n_kv * D, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=config.o_bias)

    def forward(self, x, cos, sin, order, pos, live, past, target, blocked=False):
        """Attend slots ``x`` ``[1, S, H]`` over the past entries and themselves.

        ``cos, sin, order``: the slots' RoPE rows and :func:`position_order`; ``pos`` int32
        ``[1, S]``; ``live`` bool ``[1, S]`` (None: every slot live); ``past``: keys and values
        ``[1, P, n_kv, D]`` and positions ``[1, P]`` (all live, all before the chunk), run
        eagerly the window of :func:`eager_attention` instead. ``blocked``: an ``ort`` export
        writes :func:`blocked_attention` (every slot live). Returns the output and the slots'
        post-RoPE K and V.
        """
        nh, nkv, D = self.n_heads, self.n_kv, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(1, -1, nh, D), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(1, -1, nkv, D), cos, sin)
        v = self.v_proj(x).reshape(1, -1, nkv, D)
        if not exporting():
            return self.o_proj(eager_attention(q, k, v, past, pos, live, order)), k, v
        past_k, past_v, past_pos = past
        if blocked and target == "ort" and live is None:
            g = nh // nkv
            out = blocked_attention(q, repeat_kv(k, g), repeat_kv(v, g), repeat_kv(past_k, g), repeat_kv(past_v, g),
                                    past_pos, pos, nh, D)
            return self.o_proj(out), k, v
        keys, values = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)  # [1, P+S, nkv, D]
        allowed = position_mask(past_pos, pos, live)
        keys, values = repeat_kv(keys, nh // nkv), repeat_kv(values, nh // nkv)
        if target == "ort":
            bias = torch.where(allowed, 0.0, torch.finfo(x.dtype).min).to(x.dtype).unsqueeze(1)
            out = _MultiHeadAttention.apply(merge_heads(q, nh * D), merge_heads(keys, nh * D),
                                            merge_heads(values, nh * D), bias, nh)
        else:  # trt: [1, heads, S, D] @ [1, heads, D, P+S], float32 softmax
            bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min).unsqueeze(1)
            scores = torch.matmul((q * D**-0.5).transpose(1, 2), keys.permute(0, 2, 3, 1)).float() + bias
            probs = torch.softmax(scores, dim=-1).to(x.dtype)
            out = merge_heads(torch.matmul(probs, values.transpose(1, 2)).transpose(1, 2), nh * D)
        return self.o_proj(out), k, v


#: Rows of a long chunk that the eager MLP takes at a time on the CPU: its ``[rows,
#: intermediate]`` temporaries then stay small enough to be reused warm from the allocator,
#: where a whole prefill's would be freshly mapped in every layer (next-proxy dense prefill,
#: 2 CPU threads, one MLP call vs blocks of 512: 640 tokens 1.38 -> 1.19 s, 1504 tokens
#: 3.13 -> 2.57 s, 2944 tokens 7.35 -> 6.35 s). A GPU takes the chunk whole.
MLP_ROWS = 512


class MLP(nn.Module):
    def __init__(self, config: PmodConfig):
        super().__init__()
        H, I, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)

    def forward(self, x):
        """``down(silu(gate(x)) * up(x))``; run eagerly on the CPU, a long chunk ``MLP_ROWS`` rows at a time."""
        if exporting() or x.device.type != "cpu" or x.shape[1] <= MLP_ROWS:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        out = torch.empty_like(x)
        for i in range(0, x.shape[1], MLP_ROWS):
            rows = x[:, i:i + MLP_ROWS]
            out[:, i:i + MLP_ROWS] = self.down_proj(F.silu(self.gate_proj(rows), inplace=True).mul_(self.up_proj(rows)))
        return out


#: text family (``pmod.architectures``) -> (attention, MLP) classes; norms and routing are shared
FAMILIES: dict[str, tuple[type, type]] = {"llama": (Attention, MLP)}


class Router(nn.Linear):
    """The MoD router ``Linear(H, 1)``, computed in float32 whatever the model's dtype (the
    scores decide which tokens a layer keeps; in a float16 graph the MatMul stays float32)."""

    def forward(self, x):
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


class DecoderLayer(nn.Module):
    """A decoder layer of the config's text family; with a ``ratio`` it is a MoD layer and owns a router."""

    def __init__(self, config: PmodConfig, ratio: float | None):
        super().__init__()
        attention, mlp = runtime_entry(FAMILIES, config, "torch")
        self.self_attn = attention(config)
        self.mlp = mlp(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ratio = ratio
        if ratio is not None:
            self.router = Router(config.hidden_size, 1, bias=config.mod_bias_enabled)
            kind, self.w_scale, self.w_bias = config.weight_norm
            self.w_fn = WEIGHT_FNS[kind]

    def block(self, x, tables, pos, live, past, target, blocked=False):
        a, k, v = self.self_attn(self.input_layernorm(x), *tables, pos, live, past, target, blocked)
        h = x + a
        return h, self.mlp(self.post_attention_layernorm(h)), k, v

    def route(self, x_v):
        """Router logits ``s`` and weights ``w`` ``[1, n]`` of the vision slots (float32)."""
        s = self.router(x_v)[..., 0]
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


def select_top(key: torch.Tensor, stages: list) -> torch.Tensor:
    """Indices int32 ``[1, k]`` of the ``k`` largest entries of ``key`` ``[1, n]``, descending, ties
    in index order; ``stages``: each TopK stage's K, an int or a carrier whose length is K.

    Exported as one TopK per stage, each after setting what the earlier ones took to -inf;
    eagerly a stable sort (``torch.topk`` does not promise the tie order). Entries of ``key``
    must be above -inf (padding uses ``PAD_SCORE``).
    """
    ks = [c if isinstance(c, int) else c.shape[0] for c in stages]
    if not exporting():
        return torch.sort(key, dim=-1, descending=True, stable=True).indices[:, :sum(ks)].to(torch.int32)
    parts = []
    for i, k in enumerate(ks):
        idx = torch.topk(key, k, dim=-1).indices.to(torch.int32)  # ONNX TopK: ties -> lower index
        parts.append(idx)
        if i + 1 < len(ks):  # what this stage took cannot be taken again
            key = key.scatter(1, idx.long(), float("-inf"))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def gather_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` (int32 ``[1, C]``) of ``x`` ``[1, N, ...]`` along dim 1."""
    return torch.index_select(x, 1, idx[0])


class _ScatterRows(torch.autograd.Function):
    """ONNX ``ScatterND`` of whole rows: ``data`` ``[N, H]``, ``indices`` int64 ``[C, 1]``, ``updates`` ``[C, H]``."""

    @staticmethod
    def forward(ctx, data, indices, updates):
        return data.index_copy(0, indices[:, 0], updates)

    @staticmethod
    def symbolic(g, data, indices, updates):
        return g.op("ScatterND", data, indices, updates)


def scatter_slots(x: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, target: str | None) -> torch.Tensor:
    """``x`` ``[1, N, H]`` with rows ``idx`` (distinct, int32 ``[1, C]``) replaced by ``rows``.

    ``ort``: a row-wise ScatterND (int64 indices, as ONNX requires; ONNX Runtime's elementwise
    ScatterElements was a tenth of a small p-MoD prefill). ``trt``: ScatterElements, whose
    int32 indices TensorRT prefers: the int64 cast is the last op before it, so the exporter's
    Cast can be dropped (``pmod_export.onnx_export.narrow_index_casts``). Eagerly the rows are
    written in place, saving a copy of ``x``: the caller passes a temporary.
    """
    if not exporting():
        return x.index_copy_(1, idx[0].long(), rows)
    if target == "ort":
        return _ScatterRows.apply(x[0], idx[0].long().unsqueeze(1), rows[0]).unsqueeze(0)
    index = idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]).long()
    return x.scatter(1, index, rows)


def last_hidden(h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The row of ``h`` ``[1, S, H]`` at the largest position of ``pos`` ``[1, S]`` (dead slots at -1)."""
    i = torch.argmax(pos.float(), dim=1).to(torch.int32)  # positions < 2**24: exact in float32
    return torch.index_select(h, 1, i)


class StaticDecoder(nn.Module):
    """The decoder in one static form (module docstring): ``text``, ``shape`` or ``bucket``.

    ``size``: for ``shape`` the most routed tokens a chunk may carry (N; it sets how many TopK
    stages each MoD layer needs; None: one stage each, for eager use without a limit), for
    ``bucket`` the vision slots ``B``. ``target``: the attention an export writes (``ort`` or
    ``trt``; eager runs use torch's fused attention whatever it is). ``retention`` scales the
    MoD ratios (``pmod.schedule``), fixed at build time.

    ``forward(text_embeds, text_positions, [vision_embeds, vision_positions, (keep carriers |
    n_vision)], past_key_0, past_value_0, past_positions_0, ...)`` returns ``logits`` float32
    ``[1, V]`` of the chunk's last position, then per layer ``new_key``, ``new_value`` ``[1, S_l,
    n_kv, D]`` and ``new_positions`` int32 ``[1, S_l]`` (graph names: docs/EXPORT.md).

    Run eagerly (the torch backend), each layer's ``past_*`` are windows of its KV buffers:
    the ``P_l`` live entries followed by room for the ``S_l`` new ones, which the run writes
    there (:func:`eager_attention`); the ``new_*`` outputs are then already in place.
    """

    def __init__(self, lm: LanguageModel, form: str, size: int | None, max_context: int, retention: float = 1.0,
                 target: str | None = None):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        config = lm.config
        self.lm, self.form, self.size, self.target = lm, form, size, target
        self.ratios = layer_ratios(config, retention)
        if form == "shape":
            self.stages = layer_stages(config, size, retention)
        elif form == "bucket":
            self.capacities = capacities(config, size, retention)  # C_l at B
            self.stages = [None if r is None else stage_sizes(c, topk_stages(c))
                           for r, c in zip(self.ratios, self.capacities)]
        cos, sin = rope_tables(config, max_context)
        dtype = lm.norm.weight.dtype
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)
        if form == "bucket":
            for l, r in enumerate(self.ratios):
                if r is not None:
                    table = [kept_count(n, r) for n in range(size + 1)]
                    self.register_buffer(f"kept_{l}", torch.tensor(table, dtype=torch.int32), persistent=False)

    def _tables(self, pos, ordered: bool = False):
        """The slots' RoPE rows ``[1, S, 1, D]`` and position order (``ordered``: they are in it)."""
        return self.cos[pos].unsqueeze(2), self.sin[pos].unsqueeze(2), None if ordered else position_order(pos)

    def forward(self, text_embeds, text_positions, *rest):
        form, target = self.form, self.target
        x_t, pos_t = text_embeds, text_positions
        carriers, live_v = [], None
        if form == "shape":
            x_v, pos_v, *rest = rest
            count = sum(s or 0 for s in self.stages)
            carriers, past = list(rest[:count]), rest[count:]
        elif form == "bucket":
            x_v, pos_v, n_vision, *past = rest
            live_v = torch.arange(self.size, dtype=torch.int32, device=n_vision.device).unsqueeze(0) < n_vision.unsqueeze(1)  # [1, B]
        else:
            past = rest
        new = []
        tables_t = self._tables(pos_t, ordered=True)  # text slots: consecutive positions (the chunk plan)
        if form != "text":
            pos_d = torch.cat([pos_t, pos_v], dim=1)
            tables_d = self._tables(pos_d)
        joined = None  # a dense layer's output [text; vision], which the next dense layer takes whole
        for l, layer in enumerate(self.lm.layers):
            past_l = past[3 * l: 3 * l + 3]
            Tt = x_t.shape[1]
            if form == "text":
                h, m, k, v = layer.block(x_t, tables_t, pos_t, None, past_l, target)
                x_t = h + m
                new += [k, v, pos_t]
                continue
            if layer.ratio is None:
                x = torch.cat([x_t, x_v], dim=1) if joined is None else joined
                live = None if live_v is None else torch.cat([torch.ones_like(pos_t, dtype=torch.bool), live_v], 1)
                h, m, k, v = layer.block(x, tables_d, pos_d, live, past_l, target, form == "shape")
                out = h + m
                x_t, x_v = out[:, :Tt], out[:, Tt:]
                if live_v is not None:  # padding stays inert, whatever attention gave a dead row
                    x_v = torch.where(live_v.unsqueeze(-1), x_v, torch.zeros_like(x_v))
                joined = out if live_v is None else None
                new += [k, v, pos_d]
                continue
            joined = None
            s, w = layer.route(x_v)
            skip = w.unsqueeze(-1).to(x_v.dtype) * x_v  # a skipped vision token leaves as w * x
            if form == "shape":
                stages, carriers = carriers[:self.stages[l]], carriers[self.stages[l]:]
                key = s
            else:
                stages, key = self.stages[l], torch.where(live_v, s, PAD_SCORE)
            if not stages:  # this layer keeps no vision token for any n the graph takes
                h, m, k, v = layer.block(x_t, tables_t, pos_t, None, past_l, target)
                x_t, x_v = h + m, skip
                new += [k, v, pos_t]
                continue
            idx = select_top(key, stages)  # [1, k] int32
            live_sel = None
            if form == "bucket":
                k_true = getattr(self, f"kept_{l}")[n_vision]  # [1] int32: kept_count(n, r_l)
                live_sel = torch.arange(sum(stages), dtype=torch.int32, device=k_true.device).unsqueeze(0) < k_true.unsqueeze(1)
            x = torch.cat([x_t, gather_slots(x_v, idx)], dim=1)
            pos = torch.cat([pos_t, gather_slots(pos_v, idx)], dim=1)
            live = None if live_sel is None else torch.cat([torch.ones_like(pos_t, dtype=torch.bool), live_sel], 1)
            h, m, k, v = layer.block(x, self._tables(pos), pos, live, past_l, target, form == "shape")
            gate = torch.cat([torch.ones_like(x_t[..., 0]), gather_slots(w.to(x_t.dtype), idx)], dim=1)
            out = h + gate.unsqueeze(-1) * m
            kept = out[:, Tt:]
            if live_sel is not None:
                kept = torch.where(live_sel.unsqueeze(-1), kept, gather_slots(skip, idx))
            x_t, x_v = out[:, :Tt], scatter_slots(skip, idx, kept, target)
            new += [k, v, pos]
        if form == "text":
            h_all, pos_all = x_t, pos_t
        else:
            h_all = torch.cat([x_t, x_v], dim=1)
            pos_all = torch.cat([pos_t, pos_v if live_v is None else torch.where(live_v, pos_v, -1)], dim=1)
        logits = torch.matmul(self.lm.norm(last_hidden(h_all, pos_all)), self.lm.output_weight().t()).float()
        return (logits.reshape(1, -1), *new)
