"""Names and numbers every static-graph producer and consumer agrees on.

The exporter (``pmod_export``) writes graphs with these names; the ONNX Runtime and TensorRT
engines bind them; the TensorRT build ranges their dimensions. One place, so a name or a
limit cannot drift between them.
"""

from __future__ import annotations

import math

import numpy as np

from pmod.config import PmodConfig
from pmod.errors import BadSetting
from pmod.schedule import capacities, layer_ratios

OPSET = 17
EXPORT_DTYPES = ("float32", "float16")
#: ``ort``: graphs for ONNX Runtime (its fused ``com.microsoft`` attention); ``trt``: graphs
#: TensorRT's ONNX parser takes (plain attention in the 4-D layout TensorRT fuses).
TARGETS = ("ort", "trt")
DEFAULT_TARGET = "ort"
#: TensorRT's ONNX parser: "K input must be less than 3840" (onnx-tensorrt docs/operators.md, 10.x).
TOPK_LIMIT = 3840
#: The most one TopK stage selects; a larger selection is split into stages of at most this.
TOPK_STAGE = TOPK_LIMIT - 1

BUCKET_PREFIX = "prefill_"


def kv_names(layer: int, prefix: str) -> list[str]:
    """``past_key_l, past_value_l, past_positions_l`` (prefix ``past``) or ``new_*``."""
    return [f"{prefix}_key_{layer}", f"{prefix}_value_{layer}", f"{prefix}_positions_{layer}"]


def keep_names(layer: int, stages: int) -> list[str]:
    """The kept-count carriers of MoD layer ``layer``: ``keep_l_s`` for each TopK stage ``s``.

    A carrier is a bool vector whose *length* is the K of its stage; its values are never read.
    """
    return [f"keep_{layer}_{s}" for s in range(stages)]


def topk_stages(count: int) -> int:
    """TopK stages needed to select up to ``count`` entries (each below ``TOPK_LIMIT``)."""
    return math.ceil(int(count) / TOPK_STAGE)


def stage_sizes(k: int, stages: int) -> list[int]:
    """How ``k`` selected entries split over ``stages`` TopKs: full stages first, then the rest."""
    return [min(max(int(k) - s * TOPK_STAGE, 0), TOPK_STAGE) for s in range(stages)]


def layer_stages(config: PmodConfig, max_vision: int | None, retention: float = 1.0) -> list[int | None]:
    """Per layer: None for a dense layer, else how many TopK stages its selection takes at ``N``.

    Zero stages: the layer keeps no vision token for any ``n <= N`` (no TopK, no carrier).
    ``max_vision`` None (an eager model without a limit): one stage per MoD layer, since an
    eager selection is one sort whatever its size.
    """
    ratios = layer_ratios(config, retention)
    if max_vision is None:
        return [None if r is None else 1 for r in ratios]
    return [None if r is None else topk_stages(c) for r, c in zip(ratios, capacities(config, max_vision, retention))]


def bucket_graph(size: int) -> str:
    """The name of the prefill graph for a vision bucket of ``size`` slots."""
    return f"{BUCKET_PREFIX}{int(size)}"


def is_bucket(graph: str) -> bool:
    """Whether ``graph`` names a bucket's prefill graph."""
    return graph.startswith(BUCKET_PREFIX)


def check_buckets(buckets, context: int) -> list[int]:
    """``buckets`` as a list of ints, or a one-line error unless strictly increasing, >= 1, <= ``context``."""
    try:
        sizes = [int(b) for b in buckets]
    except (TypeError, ValueError):
        raise BadSetting(f"{{buckets}} takes increasing whole numbers separated by commas (e.g. 576,1152,2880) or "
                         f"'geometric', got {buckets!r}", "buckets") from None
    if not sizes or any(b < 1 for b in sizes) or any(a >= b for a, b in zip(sizes, sizes[1:])):
        raise BadSetting(f"{{buckets}} must be strictly increasing whole numbers >= 1 (e.g. 576,1152,2880), "
                         f"got {','.join(map(str, sizes))}", "buckets")
    if sizes[-1] > context:
        raise BadSetting(f"the largest bucket {sizes[-1]} exceeds the context of {context} tokens; "
                         "lower it or raise {max_context}", "max_context")
    return sizes


def geometric_buckets(max_vision: int, steps: int = 4) -> list[int]:
    """A doubling ladder ending at ``max_vision``: ``ceil(N / 8), ceil(N / 4), ceil(N / 2), N``."""
    return sorted({max(1, math.ceil(max_vision / 2**i)) for i in range(steps)})


def one_image_vision_tokens(config: PmodConfig) -> int:
    """Routed vision tokens of the largest single image the model takes (an export's default N).

    LLaVA-1.5: one tile's rows. LLaVA-NeXT anyres: the grid (a pinpoint) whose packed map,
    uncropped, is the largest, under the model's ``mod_target_token_type``; the plan and the
    routed mask are ``pmod.image``'s.
    """
    from pmod.image import ImageInput, anyres_plan, grid_pinpoints, layout, pack_plan, patches_per_side
    from pmod.image import tokens_per_tile as per_tile

    if config.vision_config is None or config.mm_projector_type is None:
        return 0
    tile, P = config.vision_config.image_size, patches_per_side(config)
    if layout(config) == "anyres":
        cases = [((w, h), (w // tile, h // tile), anyres_plan((w, h), (w // tile, h // tile), P), P * P)
                 for w, h in grid_pinpoints(config)]
    else:
        cases = [((tile, tile), None, pack_plan((tile, tile), config), 0)]
    best = 0
    for size, grid, plan, base in cases:
        tiles = 1 + (grid[0] * grid[1] if grid else 0)
        image = ImageInput(np.zeros((tiles, 1, 1, 1), np.float32), size, grid, plan, base, per_tile(config))
        best = max(best, int(image.routed_mask(config.mod_target_token_type).sum()))
    return best
