"""Metal kernels for the MoD layer's own work, each with a pure-MLX twin.

Two kernels (``mx.fast.metal_kernel``), both one thread per output element with no
threadgroup memory, barriers or SIMD-group operations, so every thread reads only inputs
and writes only its own elements:

- ``mod_route``, one thread per token: the router weight ``w = scale * f(s) + bias`` as the
  token's gate (1 on text tokens), and whether the token is kept: text always; a vision
  token iff fewer than ``k`` vision tokens rank above it (a higher logit, or an equal one at
  a lower position). That is the top ``k`` by ``s`` with ties to the lower index, as a
  stable sort gives. The rank loop is O(n) per token, O(n^2) per row, in parallel.
- ``mod_merge``, one thread per output element: a kept token's row is ``h + gate * m``
  from its row of the layer's outputs, a skipped one's ``gate * x``; the output is written
  once, with no copy of ``x`` scattered over.

Between them, MLX turns the keep flags into the kept positions in order and each token's
row among them (``mx.cumsum``, one small scatter). The router logit ``s`` itself stays an
MLX call of the layer's router: it may be a LoRA or quantized module, and a logit computed
in a kernel would round differently from it, which could flip near-tied selections.

Sizes reach the kernels as a small int32 input (``dims``), not template arguments, so a
new prompt length does not compile a new Metal library; the template arguments are only
the element type and the weight function.

The twins compute the same values with MLX operations (``route_twin``, ``merge_twin``;
the merge twin is the layer's original formulation). The layer uses the kernels when they
are switched on (``set_enabled``) and Metal is the default device; elsewhere, the twins.
Under ``mx.grad`` the kernels run forward and the twin's derivative backward
(``mx.custom_function``), so training on Metal may use them as well.

Kernel sources are written for MLX's generated signature: an input or output ``name`` is
the pointer ``name`` (its dtype's MLX type name), template arguments are template
parameters, and ``thread_position_in_grid`` is the thread's ``uint3`` position.
``tests/test_kernels.py`` compiles these same strings as C++ against a small Metal shim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import mlx.core as mx

_enabled = True

#: The weight function ``f`` of ``config.weight_norm``: its twin, and its code in the kernel (``FN``).
WEIGHT_FNS = {"none": (lambda s: s, 0), "tanh": (mx.tanh, 1), "sigmoid": (mx.sigmoid, 2)}


def set_enabled(on: bool) -> None:
    """Switch the kernels on (the default) or off; off, the MoD layer runs the twins everywhere
    (``pmod bench --profile`` compares the two)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    """Whether the MoD layer uses the kernels now: switched on, and Metal is the default device."""
    return _enabled and mx.metal.is_available() and mx.default_device() == mx.gpu


@dataclass(frozen=True)
class Kernel:
    """A kernel body and its parameter names; MLX generates the signature from them."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    source: str


ROUTE = Kernel("mod_route", ("s", "is_vision", "vision_idx", "dims", "wnorm"), ("gate", "flag"), """
    // grid (T, B): token t of batch row b. dims = (T, n vision tokens, k kept);
    // wnorm = (scale, bias) of the weight; FN: 0 none, 1 tanh, 2 sigmoid.
    uint t = thread_position_in_grid.x;
    uint b = thread_position_in_grid.y;
    int len = dims[0], n = dims[1], k = dims[2];
    size_t at = size_t(b) * len + t;
    if (!is_vision[at]) {
        gate[at] = static_cast<T>(1.0f);
        flag[at] = 1;
        return;
    }
    float si = s[at];
    float f = si;
    if (FN == 1) {
        f = metal::precise::tanh(si);
    } else if (FN == 2) {
        f = 1.0f / (1.0f + metal::precise::exp(-si));
    }
    gate[at] = static_cast<T>(wnorm[0] * f + wnorm[1]);
    const device float* row = s + size_t(b) * len;
    const device int32_t* vis = vision_idx + size_t(b) * n;
    int rank = 0;
    for (int j = 0; j < n; ++j) {
        int p = vis[j];
        float sj = row[p];
        rank += (sj > si || (sj == si && p < int(t))) ? 1 : 0;
    }
    flag[at] = rank < k ? 1 : 0;
""")

MERGE = Kernel("mod_merge", ("x", "h", "m", "gate", "slot", "dims"), ("out",), """
    // grid (H, T, B): channel c of token t of batch row b. dims = (T, H, kept rows);
    // slot: the token's row in h and m, -1 when it skipped the layer.
    uint c = thread_position_in_grid.x;
    uint t = thread_position_in_grid.y;
    uint b = thread_position_in_grid.z;
    int len = dims[0], width = dims[1], rows = dims[2];
    size_t at = size_t(b) * len + t;
    size_t o = at * width + c;
    T g = gate[at];
    int r = slot[at];
    if (r >= 0) {
        size_t i = (size_t(b) * rows + r) * width + c;
        out[o] = h[i] + g * m[i];
    } else {
        out[o] = g * x[o];
    }
""")


@lru_cache(maxsize=None)
def _compiled(kernel: Kernel):
    return mx.fast.metal_kernel(name=kernel.name, input_names=list(kernel.inputs),
                                output_names=list(kernel.outputs), source=kernel.source)


@dataclass
class Launch:
    """One call of a kernel: everything ``mx.fast.metal_kernel`` takes, and that the C++ test emulates."""

    kernel: Kernel
    inputs: list[mx.array]
    template: list[tuple]
    grid: tuple[int, int, int]
    output_shapes: list[tuple[int, ...]]
    output_dtypes: list[mx.Dtype]

    def run(self) -> list[mx.array]:
        return _compiled(self.kernel)(
            inputs=self.inputs, template=self.template, grid=self.grid,
            threadgroup=(min(256, self.grid[0]), 1, 1),
            output_shapes=self.output_shapes, output_dtypes=self.output_dtypes)


def route_launch(s, is_vision, vision_idx, k: int, weight_norm, dtype) -> Launch:
    """``mod_route`` on logits ``s`` ``[B, T]`` float32: outputs gate ``[B, T]`` ``dtype``, flag ``[B, T]`` int32."""
    kind, scale, bias = weight_norm
    B, T = s.shape
    dims = mx.array([T, vision_idx.shape[1], k], dtype=mx.int32)
    wnorm = mx.array([scale, bias], dtype=mx.float32)
    return Launch(ROUTE, [s.astype(mx.float32), is_vision, vision_idx.astype(mx.int32), dims, wnorm],
                  [("T", dtype), ("FN", WEIGHT_FNS[kind][1])], (T, B, 1), [(B, T), (B, T)], [dtype, mx.int32])


def route_twin(s, is_vision, vision_idx, k: int, weight_norm, dtype):
    """``mod_route`` in MLX: ``(gate, flag)``; a stable sort picks the top ``k``."""
    kind, scale, bias = weight_norm
    w = scale * WEIGHT_FNS[kind][0](s) + bias
    gate = mx.where(is_vision, w, 1.0).astype(dtype)
    top = mx.stop_gradient(mx.argsort(-mx.take_along_axis(s, vision_idx, axis=1), axis=1)[:, :k])  # no gradient
    chosen = mx.take_along_axis(vision_idx, top, axis=1)
    flag = mx.put_along_axis((~is_vision).astype(mx.int32), chosen, mx.ones(chosen.shape, mx.int32), axis=1)
    return gate, flag


def merge_launch(x, h, m, gate, slot) -> Launch:
    """``mod_merge``: output ``[B, T, H]`` in ``x``'s dtype."""
    B, T, H = x.shape
    dims = mx.array([T, H, h.shape[1]], dtype=mx.int32)
    return Launch(MERGE, [x, h, m, gate, slot, dims], [("T", x.dtype)], (H, T, B), [x.shape], [x.dtype])


def merge_twin(x, h, m, gate, keep):
    """``mod_merge`` in MLX: skipped rows ``gate * x``, rows ``keep`` replaced by ``h + gate * m``."""
    out = gate[..., None] * x
    kept = h + mx.take_along_axis(gate, keep, axis=1)[..., None] * m
    return mx.put_along_axis(out, keep[..., None], kept, axis=1)


def differentiable(fast, twin):
    """``fast`` forward, differentiated as ``twin`` (the same function) backward; the
    integer and boolean arguments (positions, masks) get zero cotangents."""
    f = mx.custom_function(fast)

    @f.vjp
    def _vjp(primals, cotangents, outputs):
        floats = [i for i, p in enumerate(primals) if mx.issubdtype(p.dtype, mx.floating)]

        def of_floats(*values):
            args = list(primals)
            for i, v in zip(floats, values):
                args[i] = v
            return twin(*args)

        cot = list(cotangents) if isinstance(cotangents, (tuple, list)) else [cotangents]
        grads = [mx.zeros_like(p) for p in primals]
        for i, g in zip(floats, mx.vjp(of_floats, [primals[i] for i in floats], cot)[1]):
            grads[i] = g
        return grads

    return f


def route(s, is_vision, vision_idx, k: int, weight_norm, dtype):
    """Route one MoD layer's chunk: ``(gate, keep, slot)``.

    ``s`` ``[B, T]`` float32 router logits; ``is_vision`` ``[B, T]``; ``vision_idx`` ``[B, n]``
    the vision positions in increasing order; ``k`` vision tokens kept; ``weight_norm`` is
    ``config.weight_norm``. ``gate`` ``[B, T]`` in ``dtype``: ``w`` on vision tokens, 1 on text;
    ``keep`` ``[B, T - n + k]``: the kept positions (all text, the top ``k`` vision) in
    order; ``slot`` ``[B, T]``: each token's row in ``keep``, -1 if skipped.
    """
    static = dict(k=k, weight_norm=weight_norm, dtype=dtype)
    twin = partial(route_twin, **static)
    fn = differentiable(partial(_route_fast, **static), twin) if enabled() else twin
    gate, flag = fn(s, is_vision, vision_idx)
    return (gate, *_compact(flag, s.shape[1] - vision_idx.shape[1] + k))


def _route_fast(s, is_vision, vision_idx, k, weight_norm, dtype):
    return tuple(route_launch(s, is_vision, vision_idx, k, weight_norm, dtype).run())


def _compact(flag, n_keep: int):
    """Keep flags ``[B, T]`` -> ``(keep, slot)`` (see ``route``)."""
    B, T = flag.shape
    kept = flag.astype(mx.bool_)
    slot = mx.where(kept, mx.cumsum(flag, axis=1) - 1, -1)
    # Each kept position goes to its slot; the skipped ones all land in a spare last column.
    dest = mx.where(kept, slot, n_keep)
    pos = mx.broadcast_to(mx.arange(T, dtype=mx.int32), (B, T))
    keep = mx.put_along_axis(mx.zeros((B, n_keep + 1), mx.int32), dest, pos, axis=1)[:, :n_keep]
    return mx.stop_gradient(keep), mx.stop_gradient(slot)


def merge(x, h, m, gate, keep, slot):
    """The MoD layer's output ``[B, T, H]`` from its input ``x``, the kept rows' ``h`` and ``m``
    ``[B, n_keep, H]`` and ``route``'s ``gate``, ``keep``, ``slot``."""
    if not enabled():
        return merge_twin(x, h, m, gate, keep)
    return differentiable(_merge_fast, _merge_twin)(x, h, m, gate, keep, slot)


def _merge_fast(x, h, m, gate, keep, slot):
    return merge_launch(x, h, m, gate, slot).run()[0]


def _merge_twin(x, h, m, gate, keep, slot):
    return merge_twin(x, h, m, gate, keep)
