"""``pmod.open_engine(path, backend="mlx")``: the MLX model behind the shared interface."""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import numpy as np

from pmod.engine import Context, Engine, _normalize_inputs

from . import kernels
from .batch import MLXDecodeBatch
from .blas import blas_info
from .cache import restore_cache
from .loader import load


def device() -> str:
    """Where MLX runs: ``metal`` where Metal is available, else ``cpu``."""
    return "metal" if mx.metal.is_available() else "cpu"


def runtime_info() -> dict:
    """This runtime in this process (``pmod info --system``): ``version`` of mlx, ``device``,
    ``blas`` (:func:`pmod_mlx.blas.blas_info`) and ``kernels`` (whether the MoD layer's Metal
    kernels run, :func:`pmod_mlx.kernels.enabled`)."""
    return dict(version=mx.__version__, device=device(), blas=blas_info(), kernels=kernels.enabled())


class MLXEngine(Engine):
    profiles_layers = True

    def __init__(self, path, dtype: str | None = None, dense: bool = False, adapter_path=None,
                 retention: float | None = None):
        self.retention = 1.0 if retention is None else retention
        self.model = load(path, dtype, adapter_path=adapter_path, retention=self.retention)
        self.dense = dense  # run every layer over every token: the plain-LLaVA twin
        self.config = self.model.config
        self.dtype = self.model.language_model.norm.weight.dtype
        self.cache = self.model.make_cache()

    def prefill(self, input_ids=None, inputs_embeds=None, vision_mask=None) -> np.ndarray:
        ids, emb, mask = _normalize_inputs(input_ids, inputs_embeds, vision_mask, self.config.hidden_size)
        self.check_room(mask.shape[0])
        lm = self.model.language_model
        logits = lm(
            inputs=None if ids is None else mx.array(ids)[None],
            inputs_embeds=None if emb is None else mx.array(emb).astype(self.dtype)[None],
            vision_mask=mask if mask.any() and not self.dense else None,
            cache=self.cache,
            last_only=True,
        )
        logits = logits[0, -1].astype(mx.float32)
        mx.eval(logits, [c.state for c in self.cache])
        return np.array(logits)

    def decode(self, token_id: int) -> np.ndarray:
        return self.prefill(input_ids=np.array([int(token_id)], dtype=np.int32))

    def embed(self, input_ids) -> np.ndarray:
        ids = mx.array(np.asarray(input_ids, dtype=np.int32).reshape(-1))
        return np.array(self.model.language_model.embed_tokens(ids).astype(mx.float32))

    def encode_image(self, image) -> np.ndarray:
        model = self.model
        feats = model.encode_images(mx.array(image.pixel_values).astype(self.dtype))
        rows = [feats.reshape(-1, feats.shape[-1])]
        if "image_newline" in model:
            rows.append(model.image_newline[None].astype(feats.dtype))
        packed = mx.concatenate(rows)[mx.array(image.feature_index())]
        return np.array(packed.astype(mx.float32))

    def kv_lengths(self) -> list[int]:
        return [c.size() for c in self.cache]

    def kept_positions(self) -> list[np.ndarray]:
        return [np.array(c.positions) for c in self.cache]

    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    @property
    def position(self) -> int:
        return self.cache[0].offset

    def reset(self) -> None:
        self.cache = self.model.make_cache()

    # ------------------------------------------------------------------ contexts
    resumes = True

    def save_context(self) -> Context:
        layers = [(c.keys, c.values, c.positions) for c in self.cache]  # slices: later writes do not reach them
        mx.eval([a for layer in layers for a in layer if a is not None])
        return Context(self.position, self.kept_positions(), self.kv_bytes(), layers)

    def load_context(self, context: Context, upto: int | None = None) -> None:
        self.cache = restore_cache(context.state, context.position, upto)

    batches = True

    def new_batch(self) -> MLXDecodeBatch:
        return MLXDecodeBatch(self.model.language_model, self.dtype)

    # ------------------------------------------------------------------ the runtime
    def runtime_info(self) -> dict:
        dtype = str(self.dtype).rsplit(".", 1)[-1]  # mlx.core.float32
        return dict(device=device(), dtype=dtype, kv_dtype=dtype, blas=blas_info(), kernels=kernels.enabled())

    def matmul_probe(self, n: int):
        rng = np.random.default_rng(0)
        a, b = (mx.array(rng.standard_normal((n, n), dtype=np.float32)) for _ in range(2))
        mx.eval(a, b)
        return lambda: mx.eval(a @ b)

    @contextmanager
    def profiled(self, timer):
        """The language model calls ``timer`` (its ``probe``); MLX is lazy, so ``timer.sync`` is ``mx.eval``."""
        lm = self.model.language_model
        timer.sync = mx.eval
        lm.probe = timer
        try:
            yield
        finally:
            lm.probe = None

    def kernel_settings(self):
        """Where the Metal kernels run (``pmod_mlx.kernels``), a p-MoD engine yields True, then
        False with the kernels switched off (their MLX twins run), and switches them back on."""
        if self.dense or not kernels.enabled():
            yield None
            return
        try:
            yield True
            kernels.set_enabled(False)
            yield False
        finally:
            kernels.set_enabled(True)
