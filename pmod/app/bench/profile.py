"""``pmod bench --profile``: per-layer section times of a prefill, on the engines that time
their layers (``Engine.profiles_layers``: mlx, torch).

Each layer is split into ``route`` (scores, top-k, gather), ``attention``, ``mlp`` and
``merge`` (gating and scatter; a dense layer's residual add). Every boundary first waits
for the work before it, so a profiled prefill is slower than a timed one.
"""

from __future__ import annotations

import statistics
import time

from pmod.engine import LAYER_SECTIONS as SECTIONS


class LayerTimer:
    """Per-layer section times of one prefill, from calls at the section boundaries
    (a ``pmod.engine.LayerProbe``, attached with ``Engine.profiled``).

    ``enter(layer)`` starts a layer (``None`` ends the last one); ``mark(section)`` books the
    time since the previous boundary to ``section`` of the current layer; the time from a
    layer's last mark to the next ``enter`` is its ``merge``. ``sync`` runs first at every
    boundary with the arrays given (``Engine.profiled`` sets it where the runtime is lazy: MLX's ``mx.eval``).
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


def profile_prefill(engine, emb, mask, repeat: int) -> dict:
    """Median section times per layer over ``repeat`` prefills of ``emb`` from an empty context."""
    L = engine.config.num_hidden_layers
    runs = []
    for _ in range(repeat):
        engine.reset()
        timer = LayerTimer(L)
        with engine.profiled(timer):
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
