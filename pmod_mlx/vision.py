"""The CLIP ViT vision tower, in the style of mlx-vlm's CLIP vision model.

Parameter names follow ``transformers.CLIPVisionModel`` (``embeddings``, ``pre_layrnorm``,
``encoder.layers.i.{self_attn,layer_norm1,mlp,layer_norm2}``), so the pmod tensors
``vision_tower.*`` load as they are once :func:`sanitize` has moved the patch-embedding
conv from torch layout ``[D, C, p, p]`` to MLX layout ``[D, p, p, C]``.

LLaVA reads hidden state ``mm_vision_select_layer`` (``hidden_states[0]`` is the
pre-layernorm'd embedding, ``hidden_states[i]`` the output of layer ``i``; negative
counts from the end) and, for ``mm_vision_select_feature = "patch"``, drops the class
token row. Only the layers that hidden state needs are built and run
(``pmod.format.vision_layers_used``); ``post_layernorm`` is never used.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.format import vision_layers_used

PATCH_WEIGHT = "embeddings.patch_embedding.weight"
SELECT_FEATURES = ("patch", "cls_patch")


def quick_gelu(x: mx.array) -> mx.array:
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 x)``."""
    return x * mx.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": nn.gelu,  # exact (erf), as transformers' "gelu"
    "gelu_new": nn.gelu_approx,  # tanh approximation
    "gelu_pytorch_tanh": nn.gelu_approx,
}


class Attention(nn.Module):
    """Multi-head self-attention over all tokens (no mask), q/k/v/out with bias."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        if dims % num_heads:
            raise PmodError(
                f"vision_config 'num_attention_heads' ({num_heads}) must divide 'hidden_size' ({dims})")
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, D = x.shape
        H = self.num_heads

        def heads(a: mx.array) -> mx.array:
            return a.reshape(B, T, H, D // H).transpose(0, 2, 1, 3)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, activation):
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(dims, hidden_dims)
        self.fc2 = nn.Linear(hidden_dims, dims)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``h + mlp(ln2(h))``."""

    def __init__(self, dims: int, hidden_dims: int, num_heads: int, eps: float, activation):
        super().__init__()
        self.self_attn = Attention(dims, num_heads)
        self.layer_norm1 = nn.LayerNorm(dims, eps=eps)
        self.mlp = MLP(dims, hidden_dims, activation)
        self.layer_norm2 = nn.LayerNorm(dims, eps=eps)

    def __call__(self, x: mx.array) -> mx.array:
        h = x + self.self_attn(self.layer_norm1(x))
        return h + self.mlp(self.layer_norm2(h))


class Encoder(nn.Module):
    def __init__(self, num_layers: int, **layer_args):
        super().__init__()
        self.layers = [EncoderLayer(**layer_args) for _ in range(num_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class VisionEmbeddings(nn.Module):
    """Patch conv (no bias) + class token, plus learned absolute positions."""

    def __init__(self, dims: int, channels: int, image_size: int, patch_size: int):
        super().__init__()
        self.image_size = image_size
        self.class_embedding = mx.zeros((dims,))
        self.patch_embedding = nn.Conv2d(
            channels, dims, kernel_size=patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch_size) ** 2 + 1, dims)

    def __call__(self, x: mx.array) -> mx.array:
        """``x``: NHWC pixels ``[N, S, S, C]`` -> ``[N, 1 + P*P, D]``."""
        patches = self.patch_embedding(x)  # [N, P, P, D]
        N, D = patches.shape[0], patches.shape[-1]
        patches = patches.reshape(N, -1, D)  # row-major over (row, column), as torch's flatten(2)
        cls = mx.broadcast_to(self.class_embedding.astype(patches.dtype), (N, 1, D))
        return mx.concatenate([cls, patches], axis=1) + self.position_embedding.weight


class VisionTower(nn.Module):
    """CLIP ViT up to hidden state ``mm_vision_select_layer``; returns LLaVA's image features.

    ``tower(pixel_values)`` takes NCHW pixels ``[N, C, S, S]`` (numpy or mx, already
    normalised by the CLIP image processor, ``S = image_size``) and returns
    ``[N, P*P, D]`` (``P = S // patch_size``) for ``"patch"``, ``[N, 1 + P*P, D]`` for
    ``"cls_patch"``, in the tower's weight dtype.
    """

    def __init__(self, config: PmodConfig):
        super().__init__()
        v = config.vision_config
        if v is None:
            raise PmodError("config has no 'vision_config': this model has no vision tower")
        act = v.hidden_act
        if act not in ACTIVATIONS:
            raise PmodError(
                f"vision_config key 'hidden_act' has unsupported value {act!r}: "
                f"expected one of {', '.join(ACTIVATIONS)}")
        if config.mm_vision_select_feature not in SELECT_FEATURES:
            raise PmodError(
                f"config key 'mm_vision_select_feature' has unknown value {config.mm_vision_select_feature!r}: "
                f"expected one of {', '.join(SELECT_FEATURES)}")
        self.select_feature = config.mm_vision_select_feature
        D, eps = v.hidden_size, float(v.layer_norm_eps)
        self.image_size, self.channels = v.image_size, v.num_channels
        self.embeddings = VisionEmbeddings(D, self.channels, self.image_size, v.patch_size)
        self.pre_layrnorm = nn.LayerNorm(D, eps=eps)
        self.encoder = Encoder(
            vision_layers_used(config), dims=D, hidden_dims=v.intermediate_size,
            num_heads=v.num_attention_heads, eps=eps, activation=ACTIVATIONS[act])

    def __call__(self, pixel_values) -> mx.array:
        x = pixel_values if isinstance(pixel_values, mx.array) else mx.array(np.asarray(pixel_values))
        want = (self.channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise PmodError(
                f"pixel_values have shape {tuple(x.shape)}; the vision tower expects "
                f"[N, {want[0]}, {want[1]}, {want[2]}] (NCHW)")
        x = x.transpose(0, 2, 3, 1).astype(self.embeddings.patch_embedding.weight.dtype)
        h = self.encoder(self.pre_layrnorm(self.embeddings(x)))
        return h[:, 1:] if self.select_feature == "patch" else h


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Move ``*embeddings.patch_embedding.weight`` from torch ``[D, C, p, p]`` to MLX ``[D, p, p, C]``.

    Works on the whole model's weights (``vision_tower.`` names) or the tower's own; other
    tensors pass through. A tensor already in MLX layout (``[D, p, p, C]`` with ``C != p``)
    is left alone, so calling it twice is harmless.
    """
    out = dict(weights)
    for name, w in weights.items():
        if not name.endswith(PATCH_WEIGHT) or w.ndim != 4:
            continue
        _, a, b, c = w.shape
        if a == b and b != c:  # already [D, p, p, C]
            continue
        out[name] = w.transpose(0, 2, 3, 1)
    return out
