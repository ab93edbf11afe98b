"""Host side of the static graphs: one prefill chunk -> which graph runs and what it is fed.

The engine API takes a chunk as embeddings ``[T, H]`` plus a ``vision_mask`` ``[T]``. The
graphs take it as a text stream (the tokens MoD layers never route) and a vision stream (the
``n`` routed tokens in prompt order), each with its RoPE positions: how many tokens are text
is data, so a graph could not derive the split from shapes. The split is two gathers.

Then, by the export's vision form (docs/EXPORT.md):

* ``shape``: the vision stream is exactly ``n`` rows, and MoD layer ``l`` gets carriers
  ``keep_l_s`` (bool vectors, values unread) whose lengths are its TopK stages' K for
  ``k_l = pmod.schedule.kept_count(n, r_l)``; every output slot is live.
* ``buckets``: the smallest bucket ``B >= n`` is padded to ``B`` slots and ``n_vision``
  says how many are real; MoD layers take a constant ``C_l(B)`` and the first ``k_l`` are
  live. Each layer keeps its live slots only.

A chunk without routed vision tokens runs the ``decode`` graph, except that an export whose
prefill graph takes text alone (``text_prefill``: ONNX Runtime's, whose prefill attention is
blocked by position) runs text chunks longer than one token there, so a text-only prompt or the
dense twin prefills as fast as an image prompt; decode steps stay on the ``decode`` graph.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.schedule import capacities, layer_ratios
from pmod.static.contract import bucket_graph, keep_names, layer_stages, stage_sizes


@dataclass
class Step:
    """What one chunk runs: a graph, its inputs (the KV cache aside) and what each layer gains."""

    graph: str
    feeds: dict[str, np.ndarray]
    slots: list[int]  # new KV entries each layer's outputs hold
    live: list[int]  # how many of them (the leading ones) the layer keeps
    length: int  # tokens the chunk adds to the context


class Planner:
    """Turns chunks into :class:`Step` s for graphs of one export (or the eager torch model).

    ``max_vision``: N, the most routed tokens a chunk may carry (None: no limit, one TopK stage
    per MoD layer, as an eager model selects). ``buckets``: the bucket form's vision slots.
    ``text_prefill``: text chunks of more than one token go to the shape-form ``prefill`` graph.
    ``flag`` and ``then`` word the error for a chunk over N (what to re-export with, what else).
    """

    def __init__(self, config: PmodConfig, max_vision: int | None, retention: float = 1.0,
                 buckets: list[int] | None = None, flag: str = "--max-vision-tokens", then: str = "",
                 text_prefill: bool = False):
        self.config, self.retention, self.max_vision, self.buckets = config, retention, max_vision, buckets
        self.text_prefill = text_prefill and buckets is None
        self.ratios = layer_ratios(config, retention)
        self.stages = layer_stages(config, max_vision, retention)
        self.flag, self.then = flag, then

    def plan(self, embeds: np.ndarray, mask: np.ndarray, start: int) -> Step:
        """The step for ``embeds`` ``[T, H]`` with routed tokens ``mask`` ``[T]``, the first at position ``start``."""
        mask = np.asarray(mask, dtype=bool)
        T, H = embeds.shape
        L = len(self.ratios)
        n = int(mask.sum())
        N = self.max_vision
        if N is not None and n > N:
            raise PmodError(f"the chunk has {n} routed vision tokens but the model was exported for at most "
                            f"{N}: re-export with {self.flag} {n} or more{self.then}")
        positions = np.arange(start, start + T, dtype=np.int32)
        text = ~mask
        feeds = {"text_embeds": embeds[text][None], "text_positions": positions[text][None]}
        Tt = T - n
        if n == 0 and (T == 1 or not self.text_prefill):
            return Step("decode", feeds, [Tt] * L, [Tt] * L, T)
        kept = capacities(self.config, n, self.retention)
        live = [Tt + k for k in kept]
        if self.buckets is None:
            feeds["vision_embeds"], feeds["vision_positions"] = embeds[mask][None], positions[mask][None]
            for l, stages in enumerate(self.stages):
                if stages:
                    for name, size in zip(keep_names(l, stages), stage_sizes(kept[l], stages)):
                        feeds[name] = np.zeros(size, dtype=bool)
            return Step("prefill", feeds, live, live, T)
        B = self.buckets[bisect.bisect_left(self.buckets, n)]
        vision = np.zeros((1, B, H), dtype=embeds.dtype)
        vision[0, :n] = embeds[mask]
        pos = np.zeros((1, B), dtype=np.int32)
        pos[0, :n] = positions[mask]
        feeds.update(vision_embeds=vision, vision_positions=pos, n_vision=np.array([n], dtype=np.int32))
        slots = [Tt + c for c in capacities(self.config, B, self.retention)]
        return Step(bucket_graph(B), feeds, slots, live, T)
