"""The engine base of the fixed-graph runtimes (ONNX Runtime, TensorRT).

Everything but running a graph is the same for both: opening checks against the manifest,
the context bookkeeping, the chunk plan (:mod:`pmod.static.chunk`), the KV buffers'
reserve / commit, and the argument checks of ``embed`` and ``encode_image``. A backend says
how a graph runs and where buffers live: ``_run_decoder(step)`` (bind ``self.cache`` in
place, run, return the logits), ``_run_embed(ids)`` and ``_run_vision(pixels, index)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pmod.engine import Context, Engine, _normalize_inputs
from pmod.errors import PmodError
from pmod.static.cache import HostKV
from pmod.static.chunk import Planner, Step
from pmod.static.manifest import Manifest


class StaticEngine(Engine):
    """Fields a backend sets up in ``__init__``: ``cache`` (a :class:`~pmod.static.cache.KVBuffers`)
    and, where its graphs do not run on the CPU, ``device``."""

    #: what follows "re-export with ..." in this backend's messages (TensorRT: " and rebuild the engines")
    redo = ""
    #: where the graphs run ("cpu", "cuda")
    device = "cpu"

    def _open(self, path, m: Manifest, dtype: str | None, retention: float | None, dense: bool) -> None:
        """The checks and settings every static engine shares (call before building buffers)."""
        self.path, self.manifest = Path(path), m
        if dtype is not None and dtype != m.dtype:
            raise PmodError(f"{self.path} holds {m.dtype} graphs; for {dtype} re-export with "
                            f"'pmod export onnx --dtype {dtype}'{self.redo} (or drop --dtype)")
        if retention is not None and retention != m.retention:
            raise PmodError(f"{self.path} was exported at retention {m.retention:g} (the ratios are built into its graphs); "
                            f"for {retention:g} re-export with 'pmod export onnx --retention {retention:g}'"
                            f"{self.redo} (or drop --retention)")
        self.retention = m.retention
        self.dense = dense  # every chunk through the decode graph: the plain-LLaVA twin, routers unused
        self.max_vision, self.max_context = m.max_vision_tokens, m.max_context
        # The context this export serves: generation and check_room read it from the config.
        self.config = dataclasses.replace(m.pmod_config, max_position_embeddings=m.max_context)
        self.np_dtype = np.dtype(m.dtype)
        self.planner = Planner(self.config, m.max_vision_tokens, m.retention,
                               m.buckets if m.form == "buckets" else None, then=self.redo,
                               text_prefill=m.target == "ort" and "prefill" in m.graphs)
        self._position = 0

    def kv_capacity(self) -> list[int]:
        """Entries each layer's device buffer needs: the longest live prefix plus a bucket's dead tail."""
        m = self.manifest
        slack = m.capacities if m.form == "buckets" else [0] * len(m.capacities)
        return [self.max_context + s for s in slack]

    # ------------------------------------------------------------------ context
    def check_room(self, n_new: int) -> None:
        if self.position + n_new > self.max_context:
            raise PmodError(
                f"prompt too long: {self.position + n_new} tokens exceed the exported context of "
                f"{self.max_context} tokens; shorten the prompt or re-export with a larger --max-context{self.redo}")

    @property
    def position(self) -> int:
        return self._position

    def kv_lengths(self) -> list[int]:
        return list(self.cache.lengths)

    def kept_positions(self) -> list[np.ndarray]:
        return self.cache.held_positions()

    def kv_bytes(self) -> int:
        return self.cache.nbytes

    def reset(self) -> None:
        self.cache.reset()
        self._position = 0

    @property
    def resumes(self) -> bool:
        """Host-side buffers (ONNX Runtime on the CPU, torch) can be copied out and back; the
        fixed device buffers of ONNX Runtime on CUDA and TensorRT are bound to their graphs."""
        return isinstance(self.cache, HostKV)

    def save_context(self) -> Context:
        if not self.resumes:
            return super().save_context()
        return Context(self._position, self.cache.held_positions(), self.cache.nbytes, self.cache.snapshot())

    def load_context(self, context: Context, upto: int | None = None) -> None:
        if not self.resumes:
            return super().load_context(context, upto)
        self.cache.restore(context.state, upto)
        self._position = context.position if upto is None else min(upto, context.position)

    def runtime_info(self) -> dict:
        """The graphs' device and dtype (which the KV cache shares); no BLAS or kernels to report."""
        dtype = self.np_dtype.name
        return dict(device=self.device, dtype=dtype, kv_dtype=dtype, blas=None, kernels=None)

    # ------------------------------------------------------------------ running
    def prefill(self, input_ids=None, inputs_embeds=None, vision_mask=None) -> np.ndarray:
        return self._host(self._advance(input_ids, inputs_embeds, vision_mask))

    def decode(self, token_id: int) -> np.ndarray:
        return self.prefill(input_ids=np.array([int(token_id)], dtype=np.int32))

    def decode_greedy(self, token_id: int) -> int:
        return self._argmax(self._advance(np.array([int(token_id)], dtype=np.int32), None, None))

    def _advance(self, input_ids, inputs_embeds, vision_mask):
        """Run one chunk onto the context; its last logits as :meth:`_run_decoder` gives them."""
        ids, emb, mask = _normalize_inputs(input_ids, inputs_embeds, vision_mask, self.config.hidden_size)
        self.check_room(mask.shape[0])
        emb = self.embed(ids) if emb is None else np.asarray(emb, dtype=np.float32)
        if self.dense:
            mask = np.zeros_like(mask)
        step = self.planner.plan(emb.astype(self.np_dtype), mask, self._position)
        self.cache.reserve(step.slots)
        logits = self._run_decoder(step)
        self.cache.commit(step.live)
        self._position += step.length
        return logits

    def _host(self, logits) -> np.ndarray:
        """:meth:`_run_decoder`'s logits as a float32 numpy ``[V]`` (a device backend copies them here)."""
        return logits

    def _argmax(self, logits) -> int:
        """The greedy token of :meth:`_run_decoder`'s logits (a device backend picks it there)."""
        return int(np.argmax(self._host(logits)))

    def embed(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        V, H = self.config.vocab_size, self.config.hidden_size
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise PmodError(f"token ids must be in [0, {V}), got {int(ids.min())}..{int(ids.max())}")
        if ids.size == 0:
            return np.zeros((0, H), np.float32)
        return self._run_embed(ids.astype(np.int32)[None])[0].astype(np.float32)

    def encode_image(self, image) -> np.ndarray:
        if "vision" not in self.manifest.graphs:
            raise PmodError(f"{self.path} has no vision graph (the model has no vision tower), so it cannot "
                            "encode images: export a checkpoint that carries one")
        spec = self.manifest.graphs["vision"].inputs[0]
        pixels = np.asarray(image.pixel_values)
        if pixels.ndim != 4 or list(pixels.shape[1:]) != list(spec.shape[1:]):
            raise PmodError(f"pixel_values have shape {tuple(pixels.shape)}; the vision graph expects "
                            f"[N, {', '.join(str(d) for d in spec.shape[1:])}] (NCHW)")
        index = np.asarray(image.feature_index(), dtype=np.int32)
        return self._run_vision(np.ascontiguousarray(pixels.astype(self.np_dtype)), index).astype(np.float32)

    def _run_decoder(self, step: Step):
        """Run ``step.graph`` with ``self.cache`` bound (``bindings(step.slots)``); the logits ``[V]``
        (float32 numpy, or where the backend keeps them: see :meth:`_host`)."""
        raise NotImplementedError

    def _run_embed(self, ids: np.ndarray) -> np.ndarray:
        """``inputs_embeds`` ``[1, T, H]`` of int32 ``ids`` ``[1, T]``."""
        raise NotImplementedError

    def _run_vision(self, pixels: np.ndarray, index: np.ndarray) -> np.ndarray:
        """``image_features`` ``[tokens, H]``."""
        raise NotImplementedError
