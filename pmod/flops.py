"""Analytic prefill/decode FLOPs and KV-cache size of the decoder, dense vs p-MoD.

What is counted (docs/FLOPS.md has the formulas and the checks against the paper):

* The LLaMA decoder only: the vision tower and the projector are left out, since they are
  the same for the baseline and for p-MoD (p-MoD changes the decoder), and the token
  embedding is a lookup (0 FLOPs).
* Matrix products only, a multiply-add counted as 2 FLOPs. Norms, RoPE, softmax, SiLU,
  residual adds, the STRing scaling and biases are elementwise and left out.
* Per layer, with ``t`` tokens processed by the layer (all tokens in a dense layer,
  ``n_text + k_l`` in a MoD layer, ``k_l`` from :func:`pmod.schedule.capacities`):
  attention projections ``2 t H (2 q + 2 kv)`` (q, k, v, o; ``q = heads * head_dim``,
  ``kv = kv_heads * head_dim``), attention core ``4 * heads * head_dim * t (t + 1) / 2``
  (Q K^T and P V over the (query, key) pairs the causal mask allows among the ``t``
  tokens), MLP ``6 t H I`` (gate, up, down), and in a MoD layer the router
  ``2 H n_vision`` (every candidate vision token is scored).
* The LM head ``2 H V`` for the last position only: a prefill needs one set of logits
  (the next token); computing logits for every prompt position is wasted work.

``kv_entries`` is the number of (K, V) token slots a layer's cache holds after the
prefill; ``kv_bytes`` multiplies by ``2 * kv_heads * head_dim * bytes_per_element``.

Every p-MoD count takes the ``retention`` dial (``pmod.schedule.layer_ratios``): the
ratios, hence ``k_l``, are those the runtimes use at that setting.
"""

from __future__ import annotations

from dataclasses import dataclass

from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.schedule import capacities, check_retention, layer_ratios

KV_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

# Decoder shape of Vicuna-7B v1.5 (LLaMA-2-7B), the LLM of both released p-MoD models.
_VICUNA_7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
    max_position_embeddings=4096, tie_word_embeddings=False,
)
# MoD keys of both released models (official training scripts): every vision token is a
# routing candidate ('vision_all'); 24 MoD layers (8..31), ratios 0.844 down to 0.15.
_PMOD_KEYS = dict(
    mod_target_layers="shiftedcos_decay_0.85_0.15", mod_router_factor=0.5,
    mod_weight_norm="tanh_0.2_1", mod_target_token_type="vision_all", mod_decay_span=31,
)

#: Named model shapes for ``pmod flops --preset`` (decoder + MoD keys; no weights).
PRESETS: dict[str, dict] = {
    "llava-next-7b": {**_VICUNA_7B, **_PMOD_KEYS, "mm_projector_type": "mlp2x_gelu",
                      "mm_hidden_size": 1024, "image_aspect_ratio": "anyres",
                      "mm_patch_merge_type": "spatial_unpad"},
    "llava-1.5-7b": {**_VICUNA_7B, **_PMOD_KEYS, "mm_projector_type": "mlp2x_gelu",
                     "mm_hidden_size": 1024, "image_aspect_ratio": "pad"},
}


def preset_config(name: str) -> PmodConfig:
    """The :class:`PmodConfig` of a named preset."""
    if name not in PRESETS:
        raise PmodError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return PmodConfig(**PRESETS[name])


# ------------------------------------------------------------------------- checks
def _count(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise PmodError(f"{name} must be an integer, got {v!r}")
    if v < 0:
        raise PmodError(f"{name} must be >= 0, got {v}")
    return v


def _bytes_per_element(kv_dtype) -> int:
    if isinstance(kv_dtype, int) and not isinstance(kv_dtype, bool) and kv_dtype > 0:
        return kv_dtype
    if kv_dtype in KV_DTYPE_BYTES:
        return KV_DTYPE_BYTES[kv_dtype]
    raise PmodError(f"unknown KV dtype {kv_dtype!r}: use one of {', '.join(KV_DTYPE_BYTES)} "
                    "or a positive byte count")


def _ratios(config: PmodConfig, dense: bool, retention: float) -> list[float | None]:
    return [None] * config.num_hidden_layers if dense else layer_ratios(config, retention)


def _kept_vision(config: PmodConfig, n_vision: int, dense: bool, retention: float) -> list[int]:
    if dense:
        return [n_vision] * config.num_hidden_layers
    return capacities(config, n_vision, retention)


# ------------------------------------------------------------------------- KV cache
def kv_entries(config: PmodConfig, n_vision: int, n_text: int, dense: bool = False,
               retention: float = 1.0) -> list[int]:
    """Tokens each layer's KV cache holds after a prefill of ``n_vision`` routed vision
    tokens and ``n_text`` text tokens: all of them in a dense layer, ``n_text + k_l`` in
    a MoD layer. ``dense=True`` gives the baseline (every layer dense)."""
    n_vision, n_text = _count("n_vision", n_vision), _count("n_text", n_text)
    return [n_text + k for k in _kept_vision(config, n_vision, dense, retention)]


def kv_bytes_per_entry(config: PmodConfig, kv_dtype="float16") -> int:
    """Bytes one token takes in one layer's cache: K and V, every KV head."""
    return 2 * config.num_key_value_heads * config.head_dim * _bytes_per_element(kv_dtype)


def kv_bytes(config: PmodConfig, n_vision: int, n_text: int, dense: bool = False,
             kv_dtype="float16", retention: float = 1.0) -> int:
    """KV-cache bytes after the prefill, summed over layers (``kv_dtype``: a name in
    :data:`KV_DTYPE_BYTES` or a byte count per element)."""
    return sum(kv_entries(config, n_vision, n_text, dense, retention)) * kv_bytes_per_entry(config, kv_dtype)


# ------------------------------------------------------------------------- FLOPs
def causal_pairs(t: int) -> int:
    """(query, key) pairs a causal mask allows among ``t`` tokens at distinct positions.

    In a MoD layer the kept tokens keep their positions and attend causally to each
    other only, so the count depends on ``t`` alone: ``t (t + 1) / 2``."""
    return t * (t + 1) // 2


def _proj_flops(config: PmodConfig, t: int) -> int:
    H = config.hidden_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    return 2 * t * H * (q + 2 * kv) + 2 * t * q * H


def _core_flops(config: PmodConfig, pairs: int) -> int:
    # Q K^T and P V: head_dim multiply-adds each, per query head and allowed pair.
    return 2 * 2 * config.num_attention_heads * config.head_dim * pairs


def _mlp_flops(config: PmodConfig, t: int) -> int:
    return 2 * 3 * t * config.hidden_size * config.intermediate_size


def lm_head_flops(config: PmodConfig, positions: int = 1) -> int:
    """LM head (hidden -> vocab) for ``positions`` positions."""
    return 2 * positions * config.hidden_size * config.vocab_size


def prefill_flops(config: PmodConfig, n_vision: int, n_text: int, dense: bool = False,
                  retention: float = 1.0) -> dict:
    """FLOPs of a prefill of ``n_vision`` routed vision + ``n_text`` text tokens.

    Returns ``{"layers": [...], "decoder", "lm_head", "total", "n_vision", "n_text",
    "dense"}``; each layer entry has ``layer, ratio, kept_vision, tokens, attn_proj,
    attn_core, mlp, router, total``. ``dense=True`` gives the baseline (no routing)."""
    n_vision, n_text = _count("n_vision", n_vision), _count("n_text", n_text)
    layers = []
    for i, (r, k) in enumerate(zip(_ratios(config, dense, retention),
                                   _kept_vision(config, n_vision, dense, retention))):
        t = n_text + k
        row = dict(
            layer=i, ratio=r, kept_vision=k, tokens=t,
            attn_proj=_proj_flops(config, t),
            attn_core=_core_flops(config, causal_pairs(t)),
            mlp=_mlp_flops(config, t),
            router=0 if r is None else 2 * config.hidden_size * n_vision,
        )
        row["total"] = row["attn_proj"] + row["attn_core"] + row["mlp"] + row["router"]
        layers.append(row)
    decoder = sum(l["total"] for l in layers)
    head = lm_head_flops(config, 1 if n_vision + n_text else 0)
    return dict(layers=layers, decoder=decoder, lm_head=head, total=decoder + head,
                n_vision=n_vision, n_text=n_text, dense=dense)


def decode_flops(config: PmodConfig, context_kv_per_layer) -> dict:
    """FLOPs of one decoded (text) token, given each layer's cache length before it.

    A decoded token is never routed: every layer processes it, its query attends to the
    layer's cache plus itself. Returns ``{"layers": [...], "decoder", "lm_head", "total"}``."""
    ctx = list(context_kv_per_layer)
    if len(ctx) != config.num_hidden_layers:
        raise PmodError(f"context_kv_per_layer has {len(ctx)} entries; the model has "
                        f"{config.num_hidden_layers} layers")
    layers = []
    for i, c in enumerate(ctx):
        c = _count(f"context_kv_per_layer[{i}]", c)
        row = dict(layer=i, context=c, attn_proj=_proj_flops(config, 1),
                   attn_core=_core_flops(config, c + 1), mlp=_mlp_flops(config, 1), router=0)
        row["total"] = row["attn_proj"] + row["attn_core"] + row["mlp"]
        layers.append(row)
    decoder = sum(l["total"] for l in layers)
    head = lm_head_flops(config, 1)
    return dict(layers=layers, decoder=decoder, lm_head=head, total=decoder + head)


# ------------------------------------------------------------------------- report
@dataclass
class Report:
    """Dense baseline vs p-MoD for one config and one prefill."""

    config: PmodConfig
    n_vision: int
    n_text: int
    kv_dtype: str
    dense: dict                  # prefill_flops(..., dense=True)
    pmod: dict                   # prefill_flops(..., dense=False)
    dense_kv_entries: list[int]
    pmod_kv_entries: list[int]
    kv_bytes_per_entry: int
    retention: float = 1.0       # the dial the p-MoD side runs at

    @property
    def flops_ratio(self) -> float:
        return self.pmod["total"] / self.dense["total"] if self.dense["total"] else 1.0

    @property
    def dense_kv_bytes(self) -> int:
        return sum(self.dense_kv_entries) * self.kv_bytes_per_entry

    @property
    def pmod_kv_bytes(self) -> int:
        return sum(self.pmod_kv_entries) * self.kv_bytes_per_entry

    @property
    def kv_ratio(self) -> float:
        d = sum(self.dense_kv_entries)
        return sum(self.pmod_kv_entries) / d if d else 1.0

    def to_dict(self) -> dict:
        return dict(n_vision=self.n_vision, n_text=self.n_text, kv_dtype=self.kv_dtype, retention=self.retention,
                    dense_tflops=self.dense["total"] / 1e12, pmod_tflops=self.pmod["total"] / 1e12,
                    flops_ratio=self.flops_ratio,
                    dense_kv_entries=sum(self.dense_kv_entries),
                    pmod_kv_entries=sum(self.pmod_kv_entries),
                    dense_kv_bytes=self.dense_kv_bytes, pmod_kv_bytes=self.pmod_kv_bytes,
                    kv_ratio=self.kv_ratio)


def report(config: PmodConfig, n_vision: int, n_text: int = 0, kv_dtype: str = "float16",
           retention: float = 1.0) -> Report:
    """Compare the dense baseline with p-MoD (at ``retention``) for one prefill."""
    return Report(
        config=config, n_vision=n_vision, n_text=n_text, kv_dtype=kv_dtype,
        dense=prefill_flops(config, n_vision, n_text, dense=True),
        pmod=prefill_flops(config, n_vision, n_text, retention=retention),
        dense_kv_entries=kv_entries(config, n_vision, n_text, dense=True),
        pmod_kv_entries=kv_entries(config, n_vision, n_text, retention=retention),
        kv_bytes_per_entry=kv_bytes_per_entry(config, kv_dtype),
        retention=check_retention(retention),
    )


def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f} MiB"


def format_report(rep: Report, title: str = "") -> str:
    lines = []
    if title:
        lines.append(title)
    lines.append(f"prefill: {rep.n_vision} routed vision + {rep.n_text} text tokens; "
                 f"decoder matmul FLOPs (multiply-add = 2), LM head at the last position")
    if rep.retention != 1.0:
        lines.append(f"p-MoD at retention {rep.retention:g}: every MoD ratio scaled, clamped to [min, 1]")
    lines.append(f"{'layer':>5}  {'ratio':>7}  {'kept vis':>8}  {'KV entries':>10}  "
                 f"{'TFLOPs dense':>12}  {'TFLOPs p-MoD':>12}")
    for d, p, kv in zip(rep.dense["layers"], rep.pmod["layers"], rep.pmod_kv_entries):
        ratio = "dense" if p["ratio"] is None else f"{p['ratio']:.4f}"
        lines.append(f"{p['layer']:>5}  {ratio:>7}  {p['kept_vision']:>8}  {kv:>10}  "
                     f"{d['total'] / 1e12:>12.4f}  {p['total'] / 1e12:>12.4f}")
    lines.append(f"{'head':>5}  {'':>7}  {'':>8}  {'':>10}  "
                 f"{rep.dense['lm_head'] / 1e12:>12.4f}  {rep.pmod['lm_head'] / 1e12:>12.4f}")
    dkv, pkv = sum(rep.dense_kv_entries), sum(rep.pmod_kv_entries)
    lines.append("")
    lines.append(f"TFLOPs      dense {rep.dense['total'] / 1e12:.3f}   p-MoD {rep.pmod['total'] / 1e12:.3f}"
                 f"   ratio {100 * rep.flops_ratio:.1f}%")
    lines.append(f"KV entries  dense {dkv}   p-MoD {pkv}   ratio {100 * rep.kv_ratio:.1f}%")
    lines.append(f"KV bytes    dense {_mib(rep.dense_kv_bytes)}   p-MoD {_mib(rep.pmod_kv_bytes)}"
                 f"   ({rep.kv_dtype}, {rep.kv_bytes_per_entry} bytes per token per layer)")
    dd = decode_flops(rep.config, rep.dense_kv_entries)["total"]
    pd = decode_flops(rep.config, rep.pmod_kv_entries)["total"]
    lines.append(f"next token  dense {dd / 1e9:.2f} GFLOPs   p-MoD {pd / 1e9:.2f} GFLOPs"
                 f"   ratio {100 * pd / dd:.1f}%   (one decode step after the prefill)")
    return "\n".join(lines)
