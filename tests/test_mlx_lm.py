"""The MLX language model against transformers (MoD off) and the float64 reference (MoD on).

Tolerances
----------
* MLX float32 vs transformers float32 (dense): both round at u = 6e-8 per operation
  but in different orders; measured logit differences are 1.3e-6 to 2.3e-6, and 8.6e-6
  with tied embeddings (whose logits reach ~35). We allow 1e-4 absolute.
* MLX float32 vs the float64 reference (MoD): the float32 side carries the whole
  error, ~1e-7 relative per value. Logits (|l| <= ~5, ~35 when tied) and post-RoPE
  cache keys/values (O(1)) are compared at 1e-4 absolute: measured 0.7e-6 to 2e-6
  (9.6e-6 tied), so a 10x margin, and far below any semantic error (a wrong kept token,
  router weight or position shifts values by >1e-2).
* Routing is a discrete decision: each case asserts that the reference's k-th and
  (k+1)-th router scores are more than 1e-4 apart, so float32 rounding cannot flip a
  top-k choice, and greedy steps assert a clear top-1/top-2 logit margin.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import pmod_mlx  # noqa: E402  (a broken runtime must fail here, not skip)
from builders import (DENSE_VARIANTS, hf_llama, hf_run, random_tensors, tiny_config,  # noqa: E402
                      vision_inputs, write_checkpoint)
from reference import Reference  # noqa: E402

import pmod  # noqa: E402

TOL = 1e-4
ROUTE_MARGIN = 1e-4
ARGMAX_MARGIN = 1e-3


# ----------------------------------------------------------------------------- helpers
def mlx_logits(lm, cache, ids=None, emb=None, vm=None) -> np.ndarray:
    """All-position logits [T, V] (float64) of one chunk through ``model.language_model``."""
    out = lm(
        inputs=None if ids is None else mx.array(np.asarray(ids, np.int32)[None]),
        cache=cache,
        inputs_embeds=None if emb is None else mx.array(np.asarray(emb, np.float32)[None]),
        vision_mask=None if vm is None else mx.array(np.asarray(vm, bool)[None]),
    )
    mx.eval(out)
    assert out.shape[0] == 1 and out.ndim == 3
    return np.array(out[0].astype(mx.float32)).astype(np.float64)


def cache_np(c, n_kv: int, head_dim: int):
    if c.size() == 0 and c.keys is None:  # an empty cache may not have buffers yet
        e = np.zeros((n_kv, 0, head_dim))
        return e, e.copy(), np.array(c.positions).astype(np.int64)
    k = np.array(c.keys.astype(mx.float32))
    v = np.array(c.values.astype(mx.float32))
    assert k.shape[0] == 1 and v.shape[0] == 1
    return k[0].astype(np.float64), v[0].astype(np.float64), np.array(c.positions).astype(np.int64)


def check_route_margins(ref: Reference, vm: np.ndarray, what: str):
    """Precondition: no near-tie at the top-k boundary of any MoD layer (else pick another seed)."""
    vidx = np.nonzero(vm)[0]
    for l, kept in enumerate(ref.kept):
        if kept is None or len(kept) in (0, len(vidx)):
            continue
        s = np.sort(ref.scores[l][vidx])[::-1]
        k = len(kept)
        gap = s[k - 1] - s[k]
        assert gap > ROUTE_MARGIN, f"{what}: layer {l} router near-tie ({gap:.2g}); choose another seed"


def compare_chunk(ref: Reference, lm, cache, emb, vm, ref_logits, what: str):
    """Run the chunk through MLX and compare logits, kept indices and every layer's cache."""
    offset = ref.position - len(vm)  # the reference has already consumed the chunk
    got = mlx_logits(lm, cache, emb=emb, vm=vm)
    err = np.abs(got - ref_logits).max()
    assert err <= TOL, f"{what}: logits max err {err:.3g}"
    errs = [err]
    vis_pos = offset + np.nonzero(vm)[0]
    for l, c in enumerate(cache):
        rc = ref.cache[l]
        assert c.size() == rc["positions"].shape[0], \
            f"{what}: layer {l} holds {c.size()} tokens, reference {rc['positions'].shape[0]}"
        k, v, pos = cache_np(c, ref.nkv, ref.hd)
        np.testing.assert_array_equal(pos, rc["positions"], err_msg=f"{what}: layer {l} cache positions")
        # kept vision tokens of this chunk, read back from the cache's positions
        kept_mlx = np.intersect1d(pos, vis_pos) - offset
        kept_ref = np.nonzero(vm)[0] if ref.kept[l] is None else ref.kept[l]
        np.testing.assert_array_equal(kept_mlx, kept_ref, err_msg=f"{what}: layer {l} kept vision tokens")
        for name, a, b in (("keys", k, rc["k"]), ("values", v, rc["v"])):
            assert a.shape == b.shape, f"{what}: layer {l} cache {name} shape {a.shape} vs {b.shape}"
            e = np.abs(a - b).max() if a.size else 0.0
            assert e <= TOL, f"{what}: layer {l} cache {name} max err {e:.3g}"
            errs.append(e)
    return max(errs)


def greedy_against_reference(engine, ref: Reference, first_logits_ref, first_logits_eng, steps: int, what: str):
    """Greedy decoding: tokens equal and logits within TOL for ``steps`` tokens."""
    err = np.abs(first_logits_eng - first_logits_ref).max()
    assert err <= TOL, f"{what}: last-position logits max err {err:.3g}"
    lr, le = first_logits_ref, first_logits_eng
    toks = []
    for i in range(steps):
        top2 = np.sort(lr)[-2:]
        assert top2[1] - top2[0] > ARGMAX_MARGIN, f"{what}: step {i} near-tie in the reference's argmax"
        t = int(np.argmax(lr))
        assert int(np.argmax(le)) == t, f"{what}: greedy step {i}: MLX picks {int(np.argmax(le))}, reference {t}"
        toks.append(t)
        lr, le = ref.decode(t), engine.decode(t)
        e = np.abs(le - lr).max()
        assert e <= TOL, f"{what}: decode step {i} logits max err {e:.3g}"
        err = max(err, e)
        assert engine.kv_lengths() == ref.kv_lengths(), f"{what}: kv lengths after decode step {i}"
        assert engine.position == ref.position
    return toks, err


# ------------------------------------------------------------------- (a) vs transformers
@pytest.mark.parametrize("variant", [v for v in DENSE_VARIANTS if v != "head_dim_theta"])  # that one: test_reference
def test_mlx_matches_transformers_dense(tmp_path, variant):
    config = tiny_config(mod_target_layers=None, **DENSE_VARIANTS[variant])
    tensors = random_tensors(config, seed=11)
    ids = np.random.default_rng(12).integers(0, config.vocab_size, 33)
    hf_logits, hf_toks, hf_steps = hf_run(hf_llama(config, tensors), input_ids=ids, n_decode=8)

    path = write_checkpoint(tmp_path, config, tensors)
    model = pmod_mlx.load(path, dtype="float32")
    lm = model.language_model
    cache = lm.make_cache()
    logits = mlx_logits(lm, cache, ids=ids)
    err = np.abs(logits - hf_logits).max()
    assert err <= TOL, f"prefill max err {err:.3g}"

    engine = pmod.open_engine(path, backend="mlx", dtype="float32")
    last = engine.prefill(input_ids=ids)
    assert last.dtype == np.float32 and last.shape == (config.vocab_size,)
    assert np.abs(last - hf_logits[-1]).max() <= TOL
    assert int(np.argmax(last)) == hf_toks[0]
    for i, t in enumerate(hf_toks):
        step = engine.decode(t)
        e = np.abs(step - hf_steps[i]).max()
        assert e <= TOL, f"decode step {i}: max err {e:.3g}"
        if i + 1 < len(hf_toks):
            assert int(np.argmax(step)) == hf_toks[i + 1], f"greedy token differs at step {i}"
    assert engine.position == 33 + 8
    assert engine.kv_lengths() == [41] * config.num_hidden_layers


# ------------------------------------------------------------------- (b) vs the reference
def _mask(T, blocks):
    vm = np.zeros(T, bool)
    for a, b in blocks:
        vm[a:b] = True
    return vm


# name -> (config overrides, T, vision blocks, second chunk (T2, blocks) or None, seed)
MOD_CASES = {
    "vision_start": ({}, 44, [(0, 30)], None, 21),
    "vision_middle": ({}, 44, [(6, 36)], None, 22),
    "vision_end": ({}, 44, [(14, 44)], None, 23),
    "n_vis_0": ({}, 30, [], None, 24),
    "n_vis_1": ({}, 30, [(9, 10)], None, 25),
    "blocks": ({}, 60, [(2, 12), (20, 37), (45, 55)], None, 26),
    "mha": (dict(num_key_value_heads=4), 44, [(6, 36)], None, 27),
    "all_vision_k0": ({}, 5, [(0, 5)], (12, [(3, 9)]), 28),
    "second_chunk": ({}, 30, [(4, 20)], (30, [(5, 25)]), 29),
    "second_chunk_text_first": ({}, 20, [], (40, [(8, 34)]), 30),
    "interleave_sigmoid_nobias": (dict(mod_target_layers="interleave", mod_weight_norm="sigmoid_0.5_0.7",
                                       mod_bias_enabled=False, attention_bias=True, mlp_bias=True),
                                  44, [(6, 36)], (20, [(2, 14)]), 31),
    "deep_all_tied_rope": (dict(mod_target_layers="deep_all_include_last", mod_router_factor=0.4,
                                tie_word_embeddings=True, rope_scaling={"type": "linear", "factor": 2.0},
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16),
                           44, [(6, 36)], None, 32),
    # every router weight zero: all scores tie, the lowest vision indices must be kept
    "router_tie": ({}, 40, [(5, 31)], (16, [(2, 12)]), 33),
}


def _zero_routers(tensors):
    return {k: (np.zeros_like(v) if k.endswith("router.weight") else v) for k, v in tensors.items()}


TWEAKS = {"router_tie": _zero_routers}


@pytest.mark.parametrize("case", list(MOD_CASES))
def test_mlx_matches_reference_mod(tmp_path, case):
    overrides, T, blocks, second, seed = MOD_CASES[case]
    config = tiny_config(**overrides)
    tensors = random_tensors(config, seed=seed)
    tweak = TWEAKS.get(case)
    if tweak:
        tensors = tweak(tensors)
    rng = np.random.default_rng(seed)
    path = write_checkpoint(tmp_path, config, tensors)
    lm = pmod_mlx.load(path, dtype="float32").language_model
    cache = lm.make_cache()
    engine = pmod.open_engine(path, backend="mlx", dtype="float32")
    ref = Reference(config.to_dict(), tensors)
    ref_eng = Reference(config.to_dict(), tensors)  # follows the engine (greedy decode)

    chunks = [(T, blocks)] + ([second] if second else [])
    max_err = 0.0
    for ci, (n, bl) in enumerate(chunks):
        vm = _mask(n, bl)
        ids = rng.integers(3, config.vocab_size, n)
        emb = vision_inputs(tensors, ids, vm, seed=seed * 10 + ci)
        what = f"{case} chunk {ci}"
        ref_logits = ref.prefill(embeds=emb, vision_mask=vm)
        if tweak is _zero_routers:
            vidx = np.nonzero(vm)[0]
            for kept in ref.kept:
                if kept is not None:
                    np.testing.assert_array_equal(kept, vidx[: len(kept)])  # ties -> lower index
        else:
            check_route_margins(ref, vm, what)
        if vm.any() and config.mod_target_layers:
            assert any(k is not None and len(k) < vm.sum() for k in ref.kept), "case routes nothing"
        max_err = max(max_err, compare_chunk(ref, lm, cache, emb, vm, ref_logits, what))
        last_eng = engine.prefill(inputs_embeds=emb, vision_mask=vm)
        ref_eng.prefill(embeds=emb, vision_mask=vm)
        assert engine.kv_lengths() == ref.kv_lengths(), f"{what}: engine kv lengths"
        assert engine.position == ref.position == sum(c[0] for c in chunks[: ci + 1])
    toks, err = greedy_against_reference(engine, ref_eng, ref_logits[-1], last_eng, 10, case)
    assert len(toks) == 10
    assert max(max_err, err) <= TOL


def test_mlx_engine_reset_and_ids(tmp_path):
    """Text-only ids through a MoD model (dense path), then reset gives the same logits."""
    config = tiny_config()
    tensors = random_tensors(config, seed=40)
    path = write_checkpoint(tmp_path, config, tensors)
    engine = pmod.open_engine(path, backend="mlx", dtype="float32")
    ids = np.random.default_rng(41).integers(0, config.vocab_size, 17)
    ref = Reference(config, tensors)
    a = engine.prefill(input_ids=ids)
    assert np.abs(a - ref.prefill(ids=ids)[-1]).max() <= TOL
    engine.decode(5)
    engine.reset()
    assert engine.position == 0 and engine.kv_lengths() == [0] * config.num_hidden_layers
    b = engine.prefill(input_ids=ids)
    np.testing.assert_array_equal(a, b)


def test_batched_forward_equals_rows(tmp_path):
    """Training runs batches (no cache): each row routes its own vision tokens."""
    import mlx.core as mx

    config = tiny_config()
    tensors = random_tensors(config, seed=11)
    model = pmod_mlx.load(write_checkpoint(tmp_path, config, tensors), dtype="float32")
    rng = np.random.default_rng(0)
    T = 24
    masks = np.zeros((3, T), bool)
    masks[0, 2:14] = True
    masks[1, 10:22] = True
    masks[2, [0, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]] = True
    embeds = np.stack([vision_inputs(tensors, rng.integers(3, 90, T), m, seed=i) for i, m in enumerate(masks)])
    batched = np.array(model.language_model(inputs_embeds=mx.array(embeds), vision_mask=masks))
    for i in range(3):
        row = np.array(model.language_model(inputs_embeds=mx.array(embeds[i:i + 1]), vision_mask=masks[i:i + 1]))
        np.testing.assert_allclose(batched[i], row[0], atol=1e-5)
    with pytest.raises(pmod.PmodError, match="same number of vision tokens"):
        bad = masks.copy()
        bad[0, 2] = False
        model.language_model(inputs_embeds=mx.array(embeds), vision_mask=bad)
