"""``pmod.open_engine(path, backend="torch")``: the static-capacity torch model behind the shared interface.

It runs exactly what is exported (``StaticDecoder``, ``VisionEncoder``) on a pmod
checkpoint directory, eagerly on the CPU. ``max_vision_tokens=N`` fixes the vision stream
at ``N`` slots as the exported graphs do; left at None, each chunk gets a stream of its
own ``n`` slots (no padding: the quickest eager form, the same answers). ``retention=S``
runs the MoD layers at that dial (``pmod.schedule.layer_ratios``), as ``pmod export onnx
--retention S`` would build them.
"""

from __future__ import annotations

from . import torch_loader  # imports torch; before it, see there

import numpy as np
import torch

from pmod.engine import Engine, _normalize_inputs
from pmod.errors import PmodError
from pmod.schedule import check_retention

from .cache import KVCache
from pmod.chunk import live_lengths, split_chunk
from .model import load

# numpy has no bfloat16: its KV entries are kept as raw 16-bit words and viewed by torch.
_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class TorchEngine(Engine):
    def __init__(self, path, dtype: str | None = None, max_vision_tokens: int | None = None, dense: bool = False,
                 retention: float | None = None):
        torch_loader.check()
        self.retention = check_retention(1.0 if retention is None else retention)
        self.model = load(path, dtype)
        self.dense = dense  # run every layer over every token: the plain-LLaVA twin, routers unused
        self.config = self.model.config
        self.dtype = self.model.dtype
        if max_vision_tokens is not None and (not isinstance(max_vision_tokens, int) or max_vision_tokens < 0):
            raise PmodError(f"max_vision_tokens must be a non-negative integer, got {max_vision_tokens!r}")
        self.max_vision = max_vision_tokens
        c = self.config
        self.cache = KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, _STORAGE[self.dtype])
        self._position = 0

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t.view(self.dtype) if a.dtype == np.uint16 else t

    def prefill(self, input_ids=None, inputs_embeds=None, vision_mask=None) -> np.ndarray:
        ids, emb, mask = _normalize_inputs(input_ids, inputs_embeds, vision_mask, self.config.hidden_size)
        self.check_room(mask.shape[0])
        emb = self.embed(ids) if emb is None else np.asarray(emb, dtype=np.float32)
        if self.dense:
            mask = np.zeros_like(mask)
        n = int(mask.sum())
        N = n if self.max_vision is None else self.max_vision
        chunk = split_chunk(emb, mask, self._position, N, flag="max_vision_tokens")
        decoder = self.model.decoder(N if n else 0, retention=self.retention)
        slots = decoder.slot_counts(chunk.text_len)
        self.cache.reserve(slots)
        inputs = [torch.from_numpy(a) for a in chunk.feeds().values()]
        inputs = [t.to(self.dtype) if t.is_floating_point() else t for t in inputs]
        for l in range(len(slots)):
            inputs += [self._tensor(a) for a in self.cache.past(l)]
        with torch.inference_mode():
            out = decoder(*inputs)
        for l, s in enumerate(slots):
            for dst, src in zip(self.cache.tail(l, s), out[1 + 3 * l: 4 + 3 * l]):
                self._tensor(dst).copy_(src)
        self.cache.advance(live_lengths(self.config, chunk, self.retention))
        self._position += chunk.length
        return out[0][0].float().numpy()

    def decode(self, token_id: int) -> np.ndarray:
        return self.prefill(input_ids=np.array([int(token_id)], dtype=np.int32))

    def embed(self, input_ids) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64).reshape(-1))
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise PmodError(f"token ids must be in [0, {self.config.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        return self.model.language_model.embed_tokens.weight[ids].float().numpy()

    def encode_image(self, image) -> np.ndarray:
        encoder = self.model.vision()
        pixels = np.asarray(image.pixel_values)
        tower = encoder.tower
        want = (tower.channels, tower.image_size, tower.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise PmodError(f"pixel_values have shape {tuple(pixels.shape)}; the vision tower expects "
                            f"[N, {want[0]}, {want[1]}, {want[2]}] (NCHW)")
        with torch.inference_mode():
            out = encoder(torch.from_numpy(pixels).to(self.dtype), torch.from_numpy(image.feature_index()))
        return out.float().numpy()

    def kv_lengths(self) -> list[int]:
        return list(self.cache.lengths)

    def kept_positions(self) -> list[np.ndarray]:
        return self.cache.held_positions()

    def kv_bytes(self) -> int:
        return self.cache.nbytes

    @property
    def position(self) -> int:
        return self._position

    def reset(self) -> None:
        self.cache.reset()
        self._position = 0
