"""Data-parallel training across processes (pmod_mlx.parallel): replicas stay identical and
match single-process training on the whole batch."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pmod_mlx")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

from pmod.errors import PmodError  # noqa: E402
from pmod_mlx.parallel import Group, launch  # noqa: E402

STEPS, BATCH = 4, 8


def _data(step: int):
    rng = np.random.default_rng(step)
    return rng.standard_normal((BATCH, 6)).astype(np.float32), rng.standard_normal((BATCH, 3)).astype(np.float32)


def _train(group: Group, out_dir: str) -> None:
    """A small MLP trained ``STEPS`` steps; each rank saves its final weights and the lr it used."""
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 3))
    opt = optim.Adam(learning_rate=0.0)
    step_fn = nn.value_and_grad(model, lambda m, x, y: ((m(x) - y) ** 2).mean())
    lrs = []
    for step in range(STEPS):
        x, y = _data(step)
        x, y = group.shard(list(x)), group.shard(list(y))
        _, grads = step_fn(model, mx.array(np.stack(x)), mx.array(np.stack(y)))
        grads, info = group.all_mean(grads, {"lr": 0.01 * (step + 1)} if group.rank == 0 else None)
        opt.learning_rate = info["lr"]
        lrs.append(info["lr"])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    flat = dict(nn.utils.tree_flatten(model.parameters()))
    np.savez(f"{out_dir}/rank{group.rank}.npz", lrs=np.array(lrs), **{k: np.array(v) for k, v in flat.items()})


def _fail(group: Group, out_dir: str) -> None:
    if group.rank == 1:
        raise PmodError("rank 1 gives up")
    group.all_mean({"g": mx.zeros((3,))}, {})


def test_two_processes_stay_identical_and_match_one(tmp_path):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    launch(2, _train, str(tmp_path / "two"))
    launch(1, _train, str(tmp_path / "one"))
    r0, r1 = np.load(tmp_path / "two/rank0.npz"), np.load(tmp_path / "two/rank1.npz")
    single = np.load(tmp_path / "one/rank0.npz")
    assert list(r1["lrs"]) == list(r0["lrs"]) == [0.01, 0.02, 0.03, 0.04]  # rank 0's schedule reached rank 1
    for k in r0.files:
        assert np.array_equal(r0[k], r1[k]), k  # bit-identical replicas
        # mean of two half-batch gradients = the whole batch's gradient, up to rounding
        np.testing.assert_allclose(r0[k], single[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_a_failing_rank_stops_the_run_with_one_error(tmp_path):
    with pytest.raises(PmodError, match="another training process exited"):
        launch(2, _fail, str(tmp_path))


def test_shard_splits_a_batch():
    items = list(range(7))
    parts = [Group(r, 3).shard(items) for r in range(3)]
    assert parts == [[0, 1], [2, 3], [4, 5, 6]]
    with pytest.raises(PmodError):
        launch(0, _train, "")
