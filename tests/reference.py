"""An independent float64 numpy reference of the p-MoD LLaMA decoder.

Written from the specification (LLaMA + the p-MoD paper / official semantics), not from
the project's runtimes, so that it can check them. It deliberately imports nothing from
``pmod``: the MoD schedule is recomputed here from the config string.

Semantics in brief
------------------
* LLaMA decoder: embeddings; per layer RMSNorm -> attention (RoPE in the HF rotate-half
  convention, optional linear rope scaling, GQA, optional q/k/v/o biases, causal by
  *position*) -> residual -> RMSNorm -> SwiGLU MLP (optional biases) -> residual; final
  RMSNorm; lm_head or tied embeddings.
* p-MoD: a MoD layer routes the *vision* tokens of a chunk. Router logit
  ``s = x @ w.T + b`` on the layer input; ``k = trunc(f32(n) * f32(ratio))`` vision tokens
  with the largest ``s`` are kept (ties to the lower index). Kept tokens (all text tokens
  plus the kept vision tokens) go through the layer in their original order and positions,
  attending only to each other and to the layer's cache. A kept vision token's output is
  ``h + w * mlp(norm(h))`` with ``w = scale * f(s) + bias`` (``mod_weight_norm``); a
  skipped vision token's output is ``w * x`` and it never enters the cache. A chunk
  without vision tokens passes a MoD layer as a plain layer.
* Every layer has its own KV cache holding only the tokens it processed, with their
  positions. The model's position counter is the number of tokens fed so far.
"""

from __future__ import annotations

import math
import re

import numpy as np

_DECAY = re.compile(r"^(shiftedcos|shiftedlinear)_decay_([0-9.]+)_([0-9.]+)$")
_WNORM = re.compile(r"^(tanh|sigmoid|none)(?:_([0-9.]+)_(-?[0-9.]+))?$")


# ----------------------------------------------------------------------------- schedule
def reference_ratios(cfg: dict) -> list:
    """Per-layer retention ratio from the config dict; None marks a dense layer."""
    L = int(cfg["num_hidden_layers"])
    spec = cfg.get("mod_target_layers")
    if spec is None:
        return [None] * L
    factor = float(cfg.get("mod_router_factor", 0.5))
    m = _DECAY.match(spec)
    if m:
        kind, hi, lo = m.group(1), float(m.group(2)), float(m.group(3))
        D = cfg.get("mod_decay_span") or (L - 1)
        out = []
        for l in range(L):
            if kind == "shiftedcos":
                r = math.cos(math.pi * l / D) / 2.0 + factor
            else:
                r = 0.5 - l / D + factor
            out.append(max(r, lo) if r <= hi else None)
        return out
    if spec == "deep_all":
        routed = set(range(2, L - 1))
    elif spec == "deep_all_include_last":
        routed = set(range(2, L))
    elif spec == "interleave":
        routed = set(range(1, L, 2))
    else:
        raise ValueError(f"unknown mod_target_layers {spec!r}")
    return [factor if l in routed else None for l in range(L)]


def reference_kept_count(n: int, ratio) -> int:
    """Kept vision tokens: trunc of the float32 product (as the official code computes it)."""
    if ratio is None:
        return int(n)
    return int(math.trunc(float(np.float32(n) * np.float32(ratio))))


def reference_weight_fn(spec: str):
    m = _WNORM.match(spec)
    if not m:
        raise ValueError(f"unknown mod_weight_norm {spec!r}")
    kind = m.group(1)
    scale = float(m.group(2)) if m.group(2) else 1.0
    bias = float(m.group(3)) if m.group(3) else 1.0
    f = {"tanh": np.tanh, "sigmoid": lambda s: 1.0 / (1.0 + np.exp(-s)), "none": lambda s: s}[kind]
    return lambda s: scale * f(s) + bias


# ----------------------------------------------------------------------------- model
class Reference:
    def __init__(self, config, tensors: dict):
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        self.cfg = cfg
        self.L = int(cfg["num_hidden_layers"])
        self.H = int(cfg["hidden_size"])
        self.nh = int(cfg["num_attention_heads"])
        self.nkv = int(cfg.get("num_key_value_heads") or self.nh)
        self.hd = int(cfg.get("head_dim") or self.H // self.nh)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        theta = float(cfg.get("rope_theta", 10000.0))
        self.inv_freq = 1.0 / theta ** (np.arange(0, self.hd, 2, dtype=np.float64) / self.hd)
        rs = cfg.get("rope_scaling")
        self.pos_div = 1.0
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "linear":
                self.pos_div = float(rs["factor"])
            elif kind != "default":
                raise ValueError(f"unsupported rope_scaling {rs!r}")
        self.ratios = reference_ratios(cfg)
        self.wfn = reference_weight_fn(cfg.get("mod_weight_norm", "tanh_0.2_1"))
        self.t = {k: np.asarray(v, dtype=np.float64) for k, v in tensors.items()}
        p = "language_model."
        self.embed = self.t[p + "embed_tokens.weight"]
        self.lm_head = self.t[p + "embed_tokens.weight"] if cfg.get("tie_word_embeddings") \
            else self.t[p + "lm_head.weight"]
        self.reset()

    # -- state
    def reset(self):
        self.position = 0
        self.cache = [dict(k=np.zeros((self.nkv, 0, self.hd)), v=np.zeros((self.nkv, 0, self.hd)),
                           positions=np.zeros((0,), dtype=np.int64)) for _ in range(self.L)]
        self.kept = [None] * self.L
        self.hidden = [None] * self.L
        self.scores = [None] * self.L

    def kv_lengths(self):
        return [c["positions"].shape[0] for c in self.cache]

    # -- pieces
    def _w(self, l, name):
        return self.t.get(f"language_model.layers.{l}.{name}")

    def _lin(self, x, l, name):
        y = x @ self._w(l, name + ".weight").T
        b = self._w(l, name + ".bias")
        return y if b is None else y + b

    def _rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x, pos):
        # x [heads, T, hd], pos [T]
        freqs = (np.asarray(pos, dtype=np.float64) / self.pos_div)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb), np.sin(emb)
        half = self.hd // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rot * sin

    def _attn(self, l, x, pos):
        """Attention of tokens x [T,H] at positions pos over cache(l) + themselves; appends to cache."""
        T = x.shape[0]
        q = self._lin(x, l, "self_attn.q_proj").reshape(T, self.nh, self.hd).transpose(1, 0, 2)
        k = self._lin(x, l, "self_attn.k_proj").reshape(T, self.nkv, self.hd).transpose(1, 0, 2)
        v = self._lin(x, l, "self_attn.v_proj").reshape(T, self.nkv, self.hd).transpose(1, 0, 2)
        q, k = self._rope(q, pos), self._rope(k, pos)
        c = self.cache[l]
        c["k"] = np.concatenate([c["k"], k], axis=1)
        c["v"] = np.concatenate([c["v"], v], axis=1)
        c["positions"] = np.concatenate([c["positions"], np.asarray(pos, dtype=np.int64)])
        K, V, kpos = c["k"], c["v"], c["positions"]
        g = self.nh // self.nkv
        allowed = kpos[None, :] <= np.asarray(pos)[:, None]  # [T, S]
        out = np.empty((self.nh, T, self.hd))
        for h in range(self.nh):
            j = h // g
            s = q[h] @ K[j].T / math.sqrt(self.hd)
            s = np.where(allowed, s, -np.inf)
            s = s - s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            out[h] = p @ V[j]
        out = out.transpose(1, 0, 2).reshape(T, self.nh * self.hd)
        return self._lin(out, l, "self_attn.o_proj")

    def _mlp(self, l, x):
        g = self._lin(x, l, "mlp.gate_proj")
        u = self._lin(x, l, "mlp.up_proj")
        return self._lin(g / (1.0 + np.exp(-g)) * u, l, "mlp.down_proj")

    def _block(self, l, x, pos, w=None):
        h = x + self._attn(l, self._rms(x, self._w(l, "input_layernorm.weight")), pos)
        m = self._mlp(l, self._rms(h, self._w(l, "post_attention_layernorm.weight")))
        return h + (m if w is None else w[:, None] * m)

    def _layer(self, l, x, pos, vis):
        ratio = self.ratios[l]
        n = int(vis.sum())
        self.kept[l] = None
        self.scores[l] = None
        if ratio is None or n == 0:
            return self._block(l, x, pos)
        rw = self._w(l, "router.weight")
        rb = self._w(l, "router.bias")
        s = (x @ rw.T)[:, 0]
        if rb is not None:
            s = s + rb[0]
        vidx = np.nonzero(vis)[0]
        k = reference_kept_count(n, ratio)
        order = sorted(range(n), key=lambda i: (-s[vidx[i]], vidx[i]))  # stable: ties -> lower index
        kept_v = np.sort(vidx[order[:k]])
        self.kept[l] = kept_v
        self.scores[l] = s
        w = self.wfn(s)
        keep = ~vis.copy()
        keep[kept_v] = True
        idx = np.nonzero(keep)[0]
        out = w[:, None] * x  # skipped vision tokens (overwritten for kept tokens)
        if idx.size:
            wk = np.where(vis[idx], w[idx], 1.0)  # text tokens: plain residual
            out[idx] = self._block(l, x[idx], pos[idx], wk)
        return out

    def _final(self, x):
        return self._rms(x, self.t["language_model.norm.weight"]) @ self.lm_head.T

    # -- API
    def prefill(self, ids=None, embeds=None, vision_mask=None):
        """Feed a chunk; return logits [T, V] (float64) for all its positions."""
        if (ids is None) == (embeds is None):
            raise ValueError("give exactly one of ids or embeds")
        x = self.embed[np.asarray(ids).reshape(-1)] if ids is not None \
            else np.asarray(embeds, dtype=np.float64).reshape(-1, self.H).copy()
        T = x.shape[0]
        vis = np.zeros(T, dtype=bool) if vision_mask is None else np.asarray(vision_mask, bool).reshape(-1)
        assert vis.shape == (T,)
        pos = np.arange(self.position, self.position + T)
        for l in range(self.L):
            x = self._layer(l, x, pos, vis)
            self.hidden[l] = x
        self.position += T
        return self._final(x)

    def decode(self, token_id: int):
        """Feed one text token; return its logits [V]."""
        return self.prefill(ids=[int(token_id)])[0]

    def generate(self, n: int, first_logits):
        """Greedy tokens: argmax of ``first_logits`` then ``n - 1`` decode steps.

        Returns (tokens, logits of each decode step)."""
        toks, outs = [int(np.argmax(first_logits))], []
        for _ in range(n - 1):
            outs.append(self.decode(toks[-1]))
            toks.append(int(np.argmax(outs[-1])))
        return toks, outs
