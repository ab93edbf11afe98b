"""The p-MoD LLaVA model: language model plus the multimodal projector."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from pmod.config import PmodConfig

from .language import LanguageModel
from .vision import VisionTower


class Projector(nn.Module):
    """``linear`` or ``mlp2x_gelu`` (Linear, GELU, Linear): vision features -> LLM width."""

    def __init__(self, config: PmodConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.mm_hidden_size, config.hidden_size)
        if config.mm_projector_type == "mlp2x_gelu":
            self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.linear_1(x)
        if "linear_2" in self:
            x = self.linear_2(nn.gelu(x))
        return x


class Model(nn.Module):
    def __init__(self, config: PmodConfig, retention: float = 1.0):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config, retention)
        if config.vision_config is not None:
            self.vision_tower = VisionTower(config)
        if config.mm_projector_type is not None:
            self.projector = Projector(config)
        if "unpad" in (config.mm_patch_merge_type or "") and config.mm_projector_type is not None:
            self.image_newline = mx.zeros((config.hidden_size,))

    def encode_images(self, pixel_values) -> mx.array:
        """Projected features ``[N, P*P, H]`` of a batch of preprocessed tiles ``[N, 3, S, S]``."""
        return self.projector(self.vision_tower(pixel_values))

    def make_cache(self):
        return self.language_model.make_cache()
