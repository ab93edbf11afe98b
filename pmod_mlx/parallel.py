"""Data-parallel training across local processes, for MLX's CPU backend.

MLX's CPU backend runs each elementwise op (``exp`` in softmax, ``sigmoid`` in SiLU) on
one thread, and small models spend most of a training step there, so a second core sits
idle. ``launch(n, fn, ...)`` runs ``fn(group, ...)`` in this process as rank 0 and in
``n - 1`` spawned processes; every rank computes gradients on its share of the batch and
``group.all_mean(grads)`` averages them. Rank 0 sums the ranks' gradients in rank order and
sends every rank the same bytes, so replicas that start equal (same seed) and apply the
same optimizer stay bit-identical without ever sending weights. Rank 0 also hands out a
small ``info`` object with the result (the learning rate, a stop flag), so the other ranks
follow its time-based decisions. Gradients travel as one float32 buffer through a pipe
(about 25 ms for 6 M parameters, small next to a step of a second).

Plain pipes rather than ``mx.distributed``: its ring backend keeps threads polling,
which halved the elementwise throughput of both processes on this 2-core machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from pmod.errors import PmodError


class Group:
    """This process's place in a data-parallel run: ``rank`` of ``size``."""

    def __init__(self, rank: int = 0, size: int = 1, conns: list | None = None):
        self.rank, self.size, self._conns = rank, size, conns or []

    def all_mean(self, grads, info=None):
        """``(mean of grads over ranks, rank 0's info)``; ``grads`` is a tree of arrays."""
        if self.size == 1:
            return grads, info
        flat = tree_flatten(grads)
        mx.eval([v for _, v in flat])
        buf = np.concatenate([np.asarray(v, np.float32).ravel() for _, v in flat])
        try:
            if self.rank == 0:
                for c in self._conns:
                    buf += np.frombuffer(c.recv_bytes(), np.float32)
                buf /= self.size
                for c in self._conns:
                    c.send(info)
                    c.send_bytes(buf)
            else:
                (conn,) = self._conns
                conn.send_bytes(buf)
                info = conn.recv()
                buf = np.frombuffer(conn.recv_bytes(), np.float32)
        except (EOFError, BrokenPipeError, ConnectionResetError):
            raise PmodError(f"data-parallel rank {self.rank}: another training process exited; "
                            "see its message above") from None
        out, at = [], 0
        for k, v in flat:
            out.append((k, mx.array(buf[at:at + v.size].reshape(v.shape)).astype(v.dtype)))
            at += v.size
        return tree_unflatten(out), info

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a batch (sizes differ by at most one)."""
        n = len(items)
        lo, hi = n * self.rank // self.size, n * (self.rank + 1) // self.size
        return items[lo:hi]


def _worker(fn, rank: int, size: int, conn, args, kwargs) -> None:
    try:
        fn(Group(rank, size, [conn]), *args, **kwargs)
    except PmodError as e:
        print(f"rank {rank}: error: {e}", file=sys.stderr)
        sys.exit(1)


def launch(size: int, fn, *args, **kwargs):
    """Run ``fn(group, *args, **kwargs)`` on ``size`` ranks and return rank 0's result.

    ``fn`` must be importable by name (a module-level function) since the other ranks are
    spawned fresh. Each process's BLAS gets one thread (``size`` processes share the cores).
    """
    if size < 1:
        raise PmodError(f"need at least one process, got {size}")
    if size == 1:
        return fn(Group(), *args, **kwargs)
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        for rank in range(1, size):
            here, there = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(fn, rank, size, there, args, kwargs), daemon=True)
            p.start()
            there.close()
            procs.append(p)
            conns.append(here)
    finally:
        if saved is None:
            os.environ.pop("OPENBLAS_NUM_THREADS", None)
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved
    from .blas import set_threads

    set_threads(1)
    try:
        return fn(Group(0, size, conns), *args, **kwargs)
    finally:
        for c in conns:
            c.close()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
