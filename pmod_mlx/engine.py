"""``pmod.open_engine(path, backend="mlx")``: the MLX model behind the shared interface."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pmod.engine import Engine, _normalize_inputs

from .loader import load


class MLXEngine(Engine):
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
