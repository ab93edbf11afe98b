"""Progressive ratio decay (PRD): which layers route, and how many vision tokens each keeps.

Every runtime asks this module; nobody recomputes a ratio or a count elsewhere.

Official semantics (MCG-NJU/p-MoD, ``build_mod_layers``):
  ``r_l = cos(pi * l / D) / 2 + mod_router_factor``, layer l is a MoD layer iff
  ``r_l <= max_ratio``, and its ratio is ``max(r_l, min_ratio)``. The official code
  hard-codes ``D = 31``; pmod uses ``D = L - 1`` unless the config sets
  ``mod_decay_span``. ``shiftedlinear`` uses ``r_l = 0.5 - l / D + mod_router_factor``.
  The constant variants (``deep_all``, ``deep_all_include_last``, ``interleave``) use
  ``mod_router_factor`` as the ratio of every MoD layer.

The kept count is ``trunc(n * r)`` evaluated as the official code does it: an int32
count times the ratio, in float32 (so n=2365 at ratio 0.76448... keeps 1808, where
float64 would give 1807).

The retention dial (``--retention S``) scales the trained ratios at inference, to trade
speed for accuracy without retraining: a MoD layer's ratio becomes
``clamp(S * r_l, min_ratio, 1)`` (``min_ratio`` of a ``*_decay_*`` schedule, 0 for the
constant ones); dense layers stay dense. A MoD layer at ratio 1 still routes: it keeps
every vision token and scales them by the router weight ``w``, as the official code does
at ``k = n``.
"""

from __future__ import annotations

import math

import numpy as np

from pmod.config import _DECAY_RE, PmodConfig
from pmod.errors import BadSetting


def check_retention(retention) -> float:
    """``retention`` as a float; a one-line error unless it is a finite number > 0."""
    if isinstance(retention, bool) or not isinstance(retention, (int, float)) \
            or not math.isfinite(retention) or retention <= 0:
        raise BadSetting(f"{{retention}} must be a number > 0 (1 keeps the trained schedule), got {retention!r}",
                         "retention")
    return float(retention)


def layer_ratios(config: PmodConfig, retention: float = 1.0) -> list[float | None]:
    """Retention ratio of each decoder layer; None for a dense layer.

    ``retention`` scales every MoD layer's ratio, clamped to ``[min_ratio, 1]``; at 1 the
    trained ratios come back untouched.
    """
    scale = check_retention(retention)
    ratios = _trained_ratios(config)
    if scale == 1.0:
        return ratios
    low = min_ratio(config)
    return [None if r is None else min(1.0, max(low, scale * r)) for r in ratios]


def min_ratio(config: PmodConfig) -> float:
    """The lowest ratio a MoD layer may take: the schedule's ``min`` (0 for the constant schedules)."""
    m = _DECAY_RE.match(config.mod_target_layers or "")
    return float(m.group(3)) if m else 0.0


def _trained_ratios(config: PmodConfig) -> list[float | None]:
    L = config.num_hidden_layers
    spec = config.mod_target_layers
    if spec is None:
        return [None] * L
    factor = float(config.mod_router_factor)
    m = _DECAY_RE.match(spec)
    if m:
        kind, max_ratio, min_ratio = m.group(1), float(m.group(2)), float(m.group(3))
        span = config.mod_decay_span or max(L - 1, 1)
        if kind == "shiftedcos":
            raw = [math.cos(l * math.pi / span) / 2 + factor for l in range(L)]
        else:  # shiftedlinear
            raw = [(-l / span + 0.5) + factor for l in range(L)]
        return [max(r, min_ratio) if r <= max_ratio else None for r in raw]
    if spec == "deep_all":
        routed = range(2, L - 1)
    elif spec == "deep_all_include_last":
        routed = range(2, L)
    else:  # interleave
        routed = range(1, L, 2)
    routed = set(routed)
    return [factor if l in routed else None for l in range(L)]


def mod_layers(config: PmodConfig) -> list[int]:
    """Indices of the MoD (routed) layers."""
    return [i for i, r in enumerate(layer_ratios(config)) if r is not None]


def kept_count(n: int, ratio: float | None) -> int:
    """Vision tokens a layer keeps out of ``n``: all of them in a dense layer."""
    if ratio is None:
        return int(n)
    return int(np.trunc(np.float32(n) * np.float32(ratio)))


def capacities(config: PmodConfig, n_vision: int, retention: float = 1.0) -> list[int]:
    """Per-layer kept vision-token counts ``k_l`` for ``n_vision`` routed tokens."""
    return [kept_count(n_vision, r) for r in layer_ratios(config, retention)]
