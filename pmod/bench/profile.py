"""``pmod bench --profile``: per-layer section times of a prefill (mlx, torch).

Each layer is split into ``route`` (scores, top-k, gather), ``attention``, ``mlp`` and
``merge`` (gating and scatter; a dense layer's residual add). Every boundary first waits
for the work before it, so a profiled prefill is slower than a timed one.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

SECTIONS = ("route", "attention", "mlp", "merge")
PROFILED = ("mlx", "torch")  # backends with a per-layer profile


class LayerTimer:
    """Per-layer section times of one prefill, from calls at the section boundaries.

    ``enter(layer)`` starts a layer (``None`` ends the last one); ``mark(section)`` books the
    time since the previous boundary to ``section`` of the current layer; the time from a
    layer's last mark to the next ``enter`` is its ``merge``. ``sync`` runs first at every
    boundary with the arrays given (MLX: ``mx.eval``, since its graph is lazy).
    """

    def __init__(self, n_layers: int, sync=None):
        self.sync = sync
        self.times = [dict.fromkeys(SECTIONS, 0.0) for _ in range(n_layers)]
        self.layer = None
        self._t = 0.0

    def _clock(self, arrays) -> float:
        if self.sync is not None and arrays:
            self.sync(*arrays)
        return time.perf_counter()

    def enter(self, layer, *arrays) -> None:
        t = self._clock(arrays)
        if self.layer is not None:
            self.times[self.layer]["merge"] += t - self._t
        self.layer, self._t = layer, t

    def mark(self, section: str, *arrays) -> None:
        t = self._clock(arrays)
        self.times[self.layer][section] += t - self._t
        self._t = t


@contextmanager
def _probe(backend: str, engine, timer: LayerTimer):
    """Attach ``timer`` to the engine's decoder for one prefill (mlx, torch)."""
    if backend == "mlx":
        import mlx.core as mx
        from pmod_mlx import language

        timer.sync = mx.eval
        language.PROBE = timer
        try:
            yield
        finally:
            language.PROBE = None
        return
    # torch: eager on the CPU, so module hooks at the boundaries see finished work.
    lm, handles = engine.model.language_model, []

    def start(l):
        return lambda *_: timer.enter(l)

    def route(l):
        def hook(*_):
            if timer.layer != l:
                timer.enter(l)
            timer.mark("route")
        return hook

    def section(name):
        return lambda *_: timer.mark(name)

    try:
        for l, layer in enumerate(lm.layers):
            if layer.ratio is not None:
                handles.append(layer.router.register_forward_pre_hook(start(l)))
            handles.append(layer.input_layernorm.register_forward_pre_hook(route(l)))
            handles.append(layer.self_attn.register_forward_hook(section("attention")))
            handles.append(layer.mlp.register_forward_hook(section("mlp")))
        handles.append(lm.norm.register_forward_pre_hook(lambda *_: timer.enter(None)))
        yield
    finally:
        for h in handles:
            h.remove()


def profile_prefill(backend: str, engine, emb, mask, repeat: int) -> dict:
    """Median section times per layer over ``repeat`` prefills of ``emb`` from an empty context."""
    L = engine.config.num_hidden_layers
    runs = []
    for _ in range(repeat):
        engine.reset()
        timer = LayerTimer(L)
        with _probe(backend, engine, timer):
            t0 = time.perf_counter()
            engine.prefill(inputs_embeds=emb, vision_mask=mask)
            total = time.perf_counter() - t0
        runs.append((timer.times, total))
    layers = []
    for l in range(L):
        row = {f"{s}_s": statistics.median(r[0][l][s] for r in runs) for s in SECTIONS}
        row["total_s"] = sum(row.values())
        layers.append(row)
    prefill_s = statistics.median(r[1] for r in runs)
    return dict(prefill_s=prefill_s, rest_s=max(prefill_s - sum(x["total_s"] for x in layers), 0.0), layers=layers)
