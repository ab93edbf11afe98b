"""``MLXEngine.new_batch``: contexts prefilled alone and decoded together, each row's logits equal to
decoding its context alone (``load_context`` + ``decode``), as rows join, leave and wait.

The requests differ in prompt length and vision block (one has none), so every MoD layer's cache
holds a different number of entries per row, and each row's position is its own.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pmod_mlx")

from builders import random_tensors, tiny_config, vision_inputs, write_checkpoint  # noqa: E402

import pmod  # noqa: E402
from pmod.engine import Context  # noqa: E402
from pmod.errors import PmodError  # noqa: E402

STEPS = 7
#: (prompt length, vision block)
REQUESTS = [(14, None), (40, (4, 34)), (27, (3, 19)), (52, (10, 46))]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny p-MoD checkpoint, its 8-bit copy and the requests' (embeddings, vision mask)."""
    from pmod.convert import convert_checkpoint
    from pmod_mlx import quantize as mlx_quant

    root = tmp_path_factory.mktemp("batch")
    config = tiny_config()
    tensors = random_tensors(config, seed=11)
    path = write_checkpoint(root, config, tensors)
    q8 = convert_checkpoint(path, root / "q8", quantize=8, group_size=32, quant_ops=mlx_quant)
    rng = np.random.default_rng(12)
    prompts = []
    for i, (n, block) in enumerate(REQUESTS):
        vm = np.zeros(n, dtype=bool)
        if block:
            vm[slice(*block)] = True
        prompts.append((vision_inputs(tensors, rng.integers(3, config.vocab_size, n), vm, seed=i), vm))
    return dict(pmod=(path, {}), dense=(path, dict(dense=True)), q8=(q8, {})), prompts


def _prefill(engine, prompts) -> list[tuple[Context, int]]:
    """Each prompt prefilled alone: its context and first greedy token."""
    out = []
    for emb, vm in prompts:
        engine.reset()
        logits = engine.prefill(inputs_embeds=emb, vision_mask=vm)
        out.append((engine.save_context(), int(np.argmax(logits))))
    return out


def _alone(engine, context, token, steps):
    """Greedy decoding of ``context`` alone from ``token``: logits ``[steps, V]`` and the tokens fed."""
    engine.load_context(context)
    logits, fed = [], []
    for _ in range(steps):
        fed.append(token)
        logits.append(engine.decode(token))
        token = int(np.argmax(logits[-1]))
    return np.array(logits), fed


def _close(got, want):
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.argmax(got) == np.argmax(want)


def _same_context(got: Context, engine, context, fed):
    """``got`` holds what ``context`` holds alone after decoding ``fed``."""
    engine.load_context(context)
    for token in fed:
        engine.decode(token)
    assert got.position == engine.position
    assert all(np.array_equal(a, b) for a, b in zip(got.kept, engine.kept_positions()))
    assert got.nbytes == engine.kv_bytes()


@pytest.mark.parametrize("kind", ["pmod", "dense", "q8"])
def test_rows_join_and_leave_and_decode_as_alone(checkpoints, kind):
    models, prompts = checkpoints
    path, kw = models[kind]
    engine = pmod.open_engine(path, backend="mlx", **kw)
    assert engine.batches
    started = _prefill(engine, prompts)
    held = np.array([[len(k) for k in ctx.kept] for ctx, _ in started])  # [request, layer]
    assert len(set(held[:, 0])) == len(REQUESTS)  # each row its own length
    if kind != "dense":
        assert (held[1:, -1] < held[1:, 0]).all() and len(set(held[1])) > 2  # MoD layers keep fewer
    want = [_alone(engine, ctx, token, STEPS) for ctx, token in started]

    batch = engine.new_batch()
    live = {}  # row -> [request, steps done, next token]

    def join(i, ctx, done, token):
        live[batch.add(ctx)] = [i, done, token]

    for i in range(3):
        join(i, started[i][0], 0, started[i][1])
    for s in range(STEPS):
        if s == 2:
            join(3, started[3][0], 0, started[3][1])
        if s == 3:  # request 1 leaves; its context goes on alone, and later back in the batch
            gone = next(r for r, (i, _, _) in live.items() if i == 1)
            _, done1, token1 = live.pop(gone)
            left = batch.remove(gone)
            _same_context(left, engine, started[1][0], want[1][1][:done1])
            got, fed = _alone(engine, left, token1, STEPS - done1)
            assert fed == want[1][1][done1:]
            for g, w in zip(got, want[1][0][done1:]):
                _close(g, w)
        if s == 5:
            join(1, left, done1, token1)
        out = batch.step({row: token for row, (_, _, token) in live.items()})
        assert sorted(out) == sorted(live)
        for row, logits in out.items():
            i, done, token = live[row]
            assert token == want[i][1][done]
            _close(logits, want[i][0][done])
            live[row] = [i, done + 1, int(np.argmax(logits))]
    assert len(batch) == 4


def test_rows_not_named_wait(checkpoints):
    models, prompts = checkpoints
    path, _ = models["pmod"]
    engine = pmod.open_engine(path, backend="mlx")
    started = _prefill(engine, prompts)
    want = [_alone(engine, ctx, token, STEPS) for ctx, token in started]
    batch = engine.new_batch()
    rows = [batch.add(ctx) for ctx, _ in started]
    tokens = [token for _, token in started]
    done = [0] * len(rows)
    for names in ([0, 1, 2, 3], [0, 2], [2, 0], [1], [0, 1, 2, 3], [3], [3, 2]):
        out = batch.step({rows[i]: tokens[i] for i in names})
        assert sorted(out) == sorted(rows[i] for i in names)
        for i in names:
            assert tokens[i] == want[i][1][done[i]]
            _close(out[rows[i]], want[i][0][done[i]])
            tokens[i] = int(np.argmax(out[rows[i]]))
            done[i] += 1
    assert done == [4, 3, 5, 4]
    for i in (1, 0, 3, 2):  # waiting left holes in the others' caches: each context is exactly its own
        left = batch.remove(rows[i])
        _same_context(left, engine, started[i][0], want[i][1][: done[i]])
        got, _ = _alone(engine, left, tokens[i], 1)
        _close(got[0], want[i][0][done[i]])
    assert len(batch) == 0 and batch.step({}) == {}


def test_empty_steps_and_unknown_rows(checkpoints):
    models, prompts = checkpoints
    path, _ = models["pmod"]
    engine = pmod.open_engine(path, backend="mlx")
    batch = engine.new_batch()
    assert len(batch) == 0 and batch.step({}) == {}
    with pytest.raises(PmodError, match="no row 0 in this batch"):
        batch.remove(0)
    (ctx, token), = _prefill(engine, prompts[1:2])
    row = batch.add(ctx)
    assert len(batch) == 1 and batch.step({}) == {}
    with pytest.raises(PmodError, match=f"no row {row + 1} in this batch"):
        batch.step({row + 1: token})
    with pytest.raises(PmodError, match=f"no row {row + 1} in this batch"):
        batch.remove(row + 1)
    left = batch.remove(row)  # the empty steps changed nothing
    assert left.position == ctx.position and left.nbytes == ctx.nbytes
    assert all(np.array_equal(a, b) for a, b in zip(left.kept, ctx.kept))
    with pytest.raises(PmodError, match=f"no row {row} in this batch"):
        batch.remove(row)
    again = batch.add(left)
    assert again != row  # ids are not reused
    want, fed = _alone(engine, ctx, token, 4)
    for j in range(3):  # the lone row, stepped and then taken out, goes on as it would alone
        _close(batch.step({again: fed[j]})[again], want[j])
    last = batch.remove(again)
    assert len(batch) == 0
    _same_context(last, engine, ctx, fed[:3])
    got, _ = _alone(engine, last, fed[3], 1)
    _close(got[0], want[3])
    with pytest.raises(PmodError, match="not an MLX context of this model"):
        batch.add(Context(0, [], 0, None))
