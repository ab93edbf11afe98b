"""Seeded random weights for any config: training from scratch and benchmark presets.

GPT-2/LLaMA-style initialisation: normal(0, 0.02) matrices, output projections of the
residual branches scaled by 1/sqrt(2 * layers), norms at 1, biases at 0, routers at 0
(the official ``mod_special_init``: every vision weight starts at ``w = bias`` = 1).
"""

from __future__ import annotations

import numpy as np

from .config import PmodConfig
from .format import expected_tensors

STD = 0.02


def random_weights(config: PmodConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n_layers = config.num_hidden_layers + (config.vision_config or {}).get("num_hidden_layers", 0)
    out = {}
    for name, shape in expected_tensors(config).items():
        leaf = name.rsplit(".", 1)[-1]
        if ".router." in name or leaf == "bias":
            a = np.zeros(shape)
        elif "norm" in name and leaf == "weight":
            a = np.ones(shape)
        elif name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")):
            a = rng.normal(0.0, STD / np.sqrt(2 * n_layers), shape)
        else:
            a = rng.normal(0.0, STD, shape)
        out[name] = a.astype(np.float32)
    return out
