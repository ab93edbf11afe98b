"""MLX causal attention in query blocks (the CPU path for long chunks) vs float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pmod_mlx")

import mlx.core as mx  # noqa: E402

from pmod_mlx import language  # noqa: E402


def _reference(q, k, v, scale):
    q, k, v = (np.array(a, np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    T, S = q.shape[2], k.shape[2]
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    allowed = np.arange(S)[None, :] <= np.arange(T)[:, None] + (S - T)  # bottom-right aligned
    scores = np.where(allowed, scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("T,S,heads,kv", [(700, 700, 4, 2), (600, 900, 4, 4), (257, 300, 2, 1), (256, 256, 2, 2),
                                          (1, 40, 2, 1)])
def test_blocked_causal_attention_matches_float64(T, S, heads, kv):
    rng = np.random.default_rng(T + S)
    q, k, v = (mx.array(rng.standard_normal(shape).astype(np.float32))
               for shape in ((2, heads, T, 16), (2, kv, S, 16), (2, kv, S, 16)))
    out = language.causal_attention(q, k, v, 0.25)
    assert out.shape == (2, heads, T, 16)
    np.testing.assert_allclose(np.array(out), _reference(q, k, v, 0.25), atol=2e-6)
