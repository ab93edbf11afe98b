"""The float64 reference (tests/reference.py) checked against transformers and the schedule.

Tolerance for reference (float64) vs transformers (float32): float32 rounding is
u = 6e-8 per operation; through 6 tiny layers the logits carry ~1e-7 relative error
(measured 1.0e-6 to 1.6e-6 absolute at max|logit| ~3.5, 8.5e-6 at ~35 with tied
embeddings, i.e. 2.4e-7 to 4.5e-7 relative; HF also computes RoPE and softmax in
float32). We allow 2e-6 * max(1, max|logit|), a >4x margin, which is still far below
any real semantic error (a wrong RoPE, mask, norm or bias moves logits by >1e-2).
"""

from __future__ import annotations

import numpy as np
import pytest

from builders import DENSE_VARIANTS, hf_llama, hf_run, random_tensors, tiny_config, vision_inputs
from reference import Reference, reference_kept_count, reference_ratios

from pmod.schedule import capacities, kept_count, layer_ratios

REL_TOL = 2e-6


def _tol(logits):
    return REL_TOL * max(1.0, float(np.abs(logits).max()))


@pytest.mark.parametrize("variant", list(DENSE_VARIANTS))
def test_reference_matches_transformers_dense(variant):
    config = tiny_config(mod_target_layers=None, **DENSE_VARIANTS[variant])
    tensors = random_tensors(config, seed=1)
    ids = np.random.default_rng(2).integers(0, config.vocab_size, 37)

    hf_logits, hf_toks, hf_steps = hf_run(hf_llama(config, tensors), input_ids=ids, n_decode=8)

    ref = Reference(config.to_dict(), tensors)
    logits = ref.prefill(ids=ids)
    tol = _tol(logits)
    assert logits.shape == (37, config.vocab_size)
    err = np.abs(logits - hf_logits).max()
    assert err <= tol, f"prefill max err {err:.3g} > {tol:.3g}"
    # 8 decode steps on the same (HF-greedy) tokens.
    steps = np.array([ref.decode(t) for t in hf_toks])
    err = np.abs(steps - hf_steps).max()
    assert err <= tol, f"decode max err {err:.3g} > {tol:.3g}"
    assert [int(np.argmax(s)) for s in steps[:-1]] == hf_toks[1:]
    assert ref.position == 37 + 8
    assert ref.kv_lengths() == [45] * config.num_hidden_layers
    np.testing.assert_array_equal(ref.cache[0]["positions"], np.arange(45))


def test_reference_chunked_prefill_equals_single():
    config = tiny_config(mod_target_layers=None)
    tensors = random_tensors(config, seed=3)
    ids = np.random.default_rng(4).integers(0, config.vocab_size, 30)
    a = Reference(config, tensors).prefill(ids=ids)
    r = Reference(config, tensors)
    b = np.concatenate([r.prefill(ids=ids[:11]), r.prefill(ids=ids[11:25]), r.prefill(ids=ids[25:])])
    np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


def test_reference_mod_without_vision_is_dense():
    """A MoD model fed no vision tokens is exactly the dense LLaMA (routers unused)."""
    config = tiny_config()
    tensors = random_tensors(config, seed=5)
    ids = np.random.default_rng(6).integers(0, config.vocab_size, 25)
    hf_logits, _, _ = hf_run(hf_llama(config, tensors), input_ids=ids)
    ref = Reference(config, tensors)
    logits = ref.prefill(ids=ids)
    assert np.abs(logits - hf_logits).max() <= _tol(logits)
    assert ref.kept == [None] * config.num_hidden_layers
    assert ref.kv_lengths() == [25] * config.num_hidden_layers


def test_reference_mod_keeping_everything_with_unit_weight_is_dense():
    """Ratio 1 and w = 0*f(s) + 1 make every MoD layer an identity-weighted plain layer."""
    config = tiny_config(mod_target_layers="deep_all_include_last", mod_router_factor=1.0,
                         mod_weight_norm="none_0_1")
    tensors = random_tensors(config, seed=7)
    ids = np.random.default_rng(8).integers(0, config.vocab_size, 30)
    vm = np.zeros(30, bool)
    vm[5:21] = True
    emb = vision_inputs(tensors, ids, vm)
    hf_logits, _, _ = hf_run(hf_llama(config, tensors), inputs_embeds=emb)
    ref = Reference(config, tensors)
    logits = ref.prefill(embeds=emb, vision_mask=vm)
    assert np.abs(logits - hf_logits).max() <= _tol(logits)
    for l in range(2, 6):
        np.testing.assert_array_equal(ref.kept[l], np.arange(5, 21))


def test_reference_mod_routing_semantics():
    config = tiny_config()
    tensors = random_tensors(config, seed=9)
    T = 40
    ids = np.random.default_rng(10).integers(0, config.vocab_size, T)
    vm = np.zeros(T, bool)
    vm[4:30] = True
    emb = vision_inputs(tensors, ids, vm)
    ref = Reference(config, tensors)
    ref.prefill(embeds=emb, vision_mask=vm)
    caps = capacities(config, 26)
    text = np.nonzero(~vm)[0]
    x_in = emb.astype(np.float64)
    for l, ratio in enumerate(reference_ratios(config.to_dict())):
        if ratio is None:
            assert ref.kept[l] is None and ref.kv_lengths()[l] == T
        else:
            kept = ref.kept[l]
            assert len(kept) == caps[l]
            s = ref.scores[l]
            vis = np.nonzero(vm)[0]
            # kept = the top-k scores among vision tokens
            thr = np.sort(s[vis])[::-1][caps[l] - 1]
            assert np.all(s[kept] >= thr) and np.all(s[np.setdiff1d(vis, kept)] <= thr)
            held = np.sort(np.concatenate([text, kept]))
            np.testing.assert_array_equal(ref.cache[l]["positions"], held)
            skipped = np.setdiff1d(vis, kept)
            w = 0.2 * np.tanh(s[skipped]) + 1.0
            np.testing.assert_allclose(ref.hidden[l][skipped], w[:, None] * x_in[skipped], rtol=1e-14)
        x_in = ref.hidden[l]
    assert ref.position == T


def test_schedule_constants_32_layers():
    config = tiny_config(num_hidden_layers=32)
    ref_r = reference_ratios(config.to_dict())
    lib_r = layer_ratios(config)
    for r in (ref_r, lib_r):
        assert r[:8] == [None] * 8
        assert r[8] == pytest.approx(0.8444834595378433, abs=1e-12)
        assert r[10] == pytest.approx(0.7644820051634812, abs=1e-12)
        assert r[24:] == [0.15] * 8
        assert all(x is not None for x in r[8:])
    assert ref_r == pytest.approx(lib_r, abs=1e-15)
    # float32 product: 2365 * 0.76448... = 1807.99994 in float64 but 1808 in float32
    assert reference_kept_count(2365, ref_r[10]) == 1808
    assert kept_count(2365, lib_r[10]) == 1808
    assert capacities(config, 2365)[10] == 1808
    assert capacities(config, 2365)[:8] == [2365] * 8
    assert capacities(config, 2365) == [reference_kept_count(2365, r) for r in ref_r]


@pytest.mark.parametrize("spec,factor,L,expected", [
    ("deep_all", 0.4, 8, [None, None, 0.4, 0.4, 0.4, 0.4, 0.4, None]),
    ("deep_all_include_last", 0.4, 8, [None, None, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]),
    ("interleave", 0.3, 7, [None, 0.3, None, 0.3, None, 0.3, None]),
    ("shiftedlinear_decay_0.85_0.15", 0.5, 8,
     [None, None, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 0.15, 0.15]),
])
def test_schedule_variants(spec, factor, L, expected):
    config = tiny_config(num_hidden_layers=L, mod_target_layers=spec, mod_router_factor=factor)
    for r in (reference_ratios(config.to_dict()), layer_ratios(config)):
        assert r == pytest.approx(expected, abs=1e-12)


def test_schedule_decay_span_and_dense():
    config = tiny_config(num_hidden_layers=32, mod_decay_span=31)
    assert reference_ratios(config.to_dict()) == pytest.approx(layer_ratios(config), abs=1e-15)
    config = tiny_config(num_hidden_layers=16, mod_decay_span=31)
    r = reference_ratios(config.to_dict())
    assert r == pytest.approx(layer_ratios(config), abs=1e-15)
    assert r[:8] == [None] * 8 and r[8] == pytest.approx(0.8444834595378433)
    dense = tiny_config(mod_target_layers=None)
    assert reference_ratios(dense.to_dict()) == layer_ratios(dense) == [None] * 6
