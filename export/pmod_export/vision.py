"""The CLIP vision tower, the projector and LLaVA(-NeXT) packing (torch): the ``vision`` graph.

Parameter names follow ``transformers.CLIPVisionModel`` under ``vision_tower.`` as the pmod
format stores them (``pmod.format.vision_tensors``): only the encoder layers hidden state
``mm_vision_select_layer`` needs are built. ``patch`` drops the class token row.

Packing is the shared plan: ``ImageInput.feature_index()`` indexes the rows of
``concat(features.reshape(-1, H), image_newline[None])``, so the graph takes the pixels and
that index and returns the packed image tokens.
"""

from __future__ import annotations

from . import torch_loader  # noqa: F401  (imports torch; before it, see there)

import torch
import torch.nn as nn
import torch.nn.functional as F

from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.format import vision_layers_used

SELECT_FEATURES = ("patch", "cls_patch")


def quick_gelu(x):
    """OpenAI CLIP's activation: ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,  # exact (erf)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class Attention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        if dims % heads:
            raise PmodError(f"vision_config 'num_attention_heads' ({heads}) must divide 'hidden_size' ({dims})")
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dims, dims), nn.Linear(dims, dims)
        self.v_proj, self.out_proj = nn.Linear(dims, dims), nn.Linear(dims, dims)

    def forward(self, x):
        B, T, D = x.shape
        h = self.heads

        def split(a):
            return a.reshape(B, T, h, D // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x) * (D // h) ** -0.5), split(self.k_proj(x)), split(self.v_proj(x))
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).float(), dim=-1).to(x.dtype)
        return self.out_proj(torch.matmul(probs, v).transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dims, hidden), nn.Linear(hidden, dims), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, dims: int, hidden: int, heads: int, eps: float, act):
        super().__init__()
        self.self_attn = Attention(dims, heads)
        self.layer_norm1 = nn.LayerNorm(dims, eps=eps)
        self.mlp = MLP(dims, hidden, act)
        self.layer_norm2 = nn.LayerNorm(dims, eps=eps)

    def forward(self, x):
        h = x + self.self_attn(self.layer_norm1(x))
        return h + self.mlp(self.layer_norm2(h))


class Encoder(nn.Module):
    def __init__(self, n: int, **kw):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(**kw) for _ in range(n)])


class Embeddings(nn.Module):
    def __init__(self, dims: int, channels: int, image_size: int, patch: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(dims))
        self.patch_embedding = nn.Conv2d(channels, dims, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch) ** 2 + 1, dims)

    def forward(self, pixels):
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # [n, P*P, D]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTower(nn.Module):
    def __init__(self, config: PmodConfig):
        super().__init__()
        v = config.vision_config
        act = v.hidden_act
        if act not in ACTIVATIONS:
            raise PmodError(f"vision_config key 'hidden_act' has unsupported value {act!r}: "
                            f"expected one of {', '.join(ACTIVATIONS)}")
        if config.mm_vision_select_feature not in SELECT_FEATURES:
            raise PmodError(
                f"config key 'mm_vision_select_feature' has unknown value {config.mm_vision_select_feature!r}: "
                f"expected one of {', '.join(SELECT_FEATURES)}")
        self.select_feature = config.mm_vision_select_feature
        D, eps = v.hidden_size, float(v.layer_norm_eps)
        self.image_size, self.channels = v.image_size, v.num_channels
        self.embeddings = Embeddings(D, self.channels, self.image_size, v.patch_size)
        self.pre_layrnorm = nn.LayerNorm(D, eps=eps)
        self.encoder = Encoder(vision_layers_used(config), dims=D, hidden=v.intermediate_size,
                               heads=v.num_attention_heads, eps=eps, act=ACTIVATIONS[act])

    def forward(self, pixels):
        h = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            h = layer(h)
        return h[:, 1:] if self.select_feature == "patch" else h


class Projector(nn.Module):
    """``linear`` or ``mlp2x_gelu`` (Linear, exact GELU, Linear)."""

    def __init__(self, config: PmodConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.mm_hidden_size, config.hidden_size)
        if config.mm_projector_type == "mlp2x_gelu":
            self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        x = self.linear_1(x)
        return self.linear_2(F.gelu(x)) if hasattr(self, "linear_2") else x


class VisionEncoder(nn.Module):
    """``pixel_values [tiles, C, S, S]``, ``feature_index`` int32 ``[tokens]`` -> ``image_features [tokens, H]``."""

    def __init__(self, tower: VisionTower, projector: Projector, image_newline: nn.Parameter | None):
        super().__init__()
        self.tower, self.projector, self.image_newline = tower, projector, image_newline

    def forward(self, pixel_values, feature_index):
        feats = self.projector(self.tower(pixel_values))
        rows = feats.reshape(-1, feats.shape[-1])
        if self.image_newline is not None:
            rows = torch.cat([rows, self.image_newline.to(rows.dtype).unsqueeze(0)], dim=0)
        return torch.index_select(rows, 0, feature_index)
