"""The embedded model's auxiliary training losses, in MLX: the label heads and the binding loss.

``LabelHeads`` are linear probes from the vision tower's features to the scene labels
(``pmod.tasks.shapes.labels``); ``binding_loss`` steers one attention head, from where each
answer is predicted, to the object its question names. Neither is part of the checkpoint.
MLX work: imports ``mlx`` and ``pmod_mlx``.
"""

from __future__ import annotations

import pmod_mlx  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn

from pmod.config import PmodConfig
from pmod.schedule import layer_ratios
from pmod.tasks.shapes.batches import Binding
from pmod.tasks.shapes.labels import COLOUR_NAMES, KINDS, MAX_COUNT, SHAPE_NAMES
from pmod_mlx.language import apply_rope, rope_tables
from pmod_mlx.model import Model
from pmod_mlx.train import input_embeddings


class LabelHeads(nn.Module):
    """Linear probes from the tower's features to the patch labels, and from their mean over
    the image to the scene labels (training only). The mean is what a decoder head that
    spreads its attention over the image tokens reads, so the scene heads teach the tower to
    write each object's colour, shape, count and side where a plain average keeps them."""

    def __init__(self, dims: int):
        super().__init__()
        self.count = nn.Linear(dims, (1 + len(KINDS)) * (MAX_COUNT + 1))
        self.sides = nn.Linear(dims, 2 * len(KINDS) * 4)
        self.colour = nn.Linear(dims, 1 + len(COLOUR_NAMES))
        self.shape = nn.Linear(dims, 1 + len(SHAPE_NAMES))
        self.centre = nn.Linear(dims, 2)
        self.across = nn.Linear(dims, 4)
        self.down = nn.Linear(dims, 4)

    def loss(self, features: mx.array, labels: mx.array, scene: mx.array) -> mx.array:
        """Sum of the five patch cross-entropies (on shape and sides, object patches weigh 4x:
        they are the minority) and the two scene ones (counts, sides)."""
        ce = nn.losses.cross_entropy
        on_object = (labels[:, 1] > 0).astype(mx.float32) * 3 + 1

        def weighted(head, i):
            return (ce(head(features), labels[:, i], reduction="none") * on_object).sum() / on_object.sum()

        return (ce(self.colour(features), labels[:, 0]).mean() + weighted(self.shape, 1)
                + ce(self.centre(features), labels[:, 2]).mean() + weighted(self.across, 3) + weighted(self.down, 4)
                + self.scene_loss(features.mean(axis=1), scene))

    def scene_loss(self, pooled: mx.array, scene: mx.array) -> mx.array:
        B, n = pooled.shape[0], 1 + len(KINDS)
        counts = self.count(pooled).reshape(B, n, MAX_COUNT + 1)
        sides = self.sides(pooled).reshape(B, 2 * len(KINDS), 4)
        ce = nn.losses.cross_entropy
        return ce(counts, scene[:, :n]).mean() + ce(sides, scene[:, n:]).mean()


class LayerInput:
    """Keeps the decoder's input to one layer, as the language model's ``probe``."""

    def __init__(self, layer: int):
        self.layer, self.h = layer, None

    def enter(self, i, h) -> None:
        if i == self.layer:
            self.h = h

    def mark(self, *_) -> None:
        pass


def bind_layer(config: PmodConfig) -> int:
    """The last dense layer before the first MoD layer (it sees every vision token): its
    head 0 is the one steered."""
    ratios = layer_ratios(config)
    return next((i for i, r in enumerate(ratios) if r is not None), len(ratios)) - 1


def binding_loss(model: Model, h: mx.array, batch, bind: Binding) -> mx.array:
    """Mean ``-log`` of the attention that head 0 of ``bind_layer`` pays, from the position
    that predicts an answer, to the patches of the object the question names. Left to the answer
    loss alone, the small decoder learns to answer "what colour is the star?" with the
    colour most of the image has: the shortcut a head that attends evenly allows."""
    lm = model.language_model
    layer = lm.layers[bind_layer(lm.config)]
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    B, T, _ = x.shape
    Q, D = bind.query.shape[1], attn.head_dim
    q = attn.q_proj(mx.take_along_axis(x, bind.query[..., None], axis=1)).reshape(B, Q, attn.n_heads, D)
    k = attn.k_proj(x).reshape(B, T, attn.n_kv_heads, D)
    q = apply_rope(q[:, :, 0][:, None], rope_tables(lm.config, bind.query))  # [B, 1, Q, D]
    k = apply_rope(k[:, :, 0][:, None], rope_tables(lm.config, mx.arange(T)))  # [B, 1, T, D]
    scores = (q * attn.scale) @ k.swapaxes(-1, -2)
    causal = mx.arange(T)[None, None, None] <= bind.query[:, None, :, None]
    p = mx.softmax(mx.where(causal, scores, -1e9), axis=-1)[:, 0]  # [B, Q, T]
    n = batch.image_pos.shape[1]
    on_image = mx.take_along_axis(p, mx.broadcast_to(batch.image_pos[:, None], (B, Q, n)), axis=-1)
    mass = (on_image * bind.patches).sum(-1)
    return -(mx.log(mass + 1e-6) * bind.named).sum() / mx.maximum(bind.named.sum(), 1.0)


def language_logits(model: Model, batch, features: mx.array | None = None, layer_input: LayerInput | None = None):
    """The decoder's logits for ``batch``; with ``layer_input``, it keeps its layer's input."""
    lm = model.language_model
    lm.probe = layer_input
    try:
        return lm(inputs_embeds=input_embeddings(model, batch, features), vision_mask=batch.vision_mask)
    finally:
        lm.probe = None
