"""Seeded random weights for any config: training from scratch and benchmark presets.

The vision tower starts as GPT-2/CLIP usually do: normal(0, 0.02) matrices. The decoder
and the projector start at unit scale: every matrix normal(0, 1/sqrt(fan_in)), token
embeddings normal(0, 1). The 0.02 convention is that value for a width of ~2500; in a
narrow decoder (the embedded model's is 128 wide) it shrinks every signal by about four
per matrix, so attention starts uniform with vanishing query/key gradients and a fresh
decoder stays at chance for thousands of steps before it learns to look anything up
(``scripts/decoder_probe.py --std 0.02`` measures the difference). Everywhere: output
projections of the residual branches scaled by 1/sqrt(2 * layers), norms at 1, biases
at 0, routers at 0 (the official ``mod_special_init``: every vision weight starts at
``w = bias`` = 1).
"""

from __future__ import annotations

import numpy as np

from pmod.config import PmodConfig
from pmod.format import expected_tensors

STD = 0.02
RESIDUAL_OUT = ("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")


def init_rule(config: PmodConfig, name: str, shape, std: float | None = None,
              spread_routers: bool = False) -> tuple[str, float]:
    """How tensor ``name`` starts: ``("zeros" | "ones", 0)`` or ``("normal", std)`` (the module
    docstring's scheme; :func:`random_weights` draws it with numpy, the torch runtime on its
    device). ``spread_routers``: routers normal(0, 1/sqrt(fan_in)) instead of 0, so that a random
    model's routing picks a real top-k (benchmark presets) rather than ties."""
    leaf = name.rsplit(".", 1)[-1]
    if ".router." in name:
        return ("normal", shape[-1] ** -0.5) if spread_routers and leaf == "weight" else ("zeros", 0.0)
    if leaf == "bias":
        return "zeros", 0.0
    if "norm" in name and leaf == "weight":
        return "ones", 0.0
    vision = name.startswith("vision_tower.")
    layers = config.vision_config.num_hidden_layers if vision else config.num_hidden_layers
    s = STD if vision else std or (1.0 if "embed_tokens" in name else shape[-1] ** -0.5)
    return "normal", s / np.sqrt(2 * layers) if name.endswith(RESIDUAL_OUT) else s


def random_weights(config: PmodConfig, seed: int = 0, std: float | None = None,
                   spread_routers: bool = False) -> dict[str, np.ndarray]:
    """``std``: every decoder and projector matrix, token embeddings included, at this std
    instead of unit scale (the residual-out scaling still applies)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_tensors(config).items():
        kind, s = init_rule(config, name, shape, std, spread_routers)
        a = rng.normal(0.0, s, shape) if kind == "normal" else (np.ones if kind == "ones" else np.zeros)(shape)
        out[name] = a.astype(np.float32)
    return out
