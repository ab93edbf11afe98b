"""Tiny multimodal models and LLaVA-JSONL data sets for the LoRA tests."""

from __future__ import annotations

import json
from pathlib import Path

from builders import random_tensors, tiny_config, write_checkpoint
from tiny_tokenizer import write_tiny_tokenizer

from pmod.tasks import shapes

# A LLaVA-1.5-style tower: 32 px images, 8 px patches -> 16 image tokens, all routed.
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, num_channels=3, layer_norm_eps=1e-5, hidden_act="quick_gelu",
              model_type="clip_vision_model")


def vision_config(**overrides):
    kw = dict(vision_config=dict(VISION), mm_projector_type="mlp2x_gelu", mm_hidden_size=32,
              mod_target_token_type="vision_all")
    return tiny_config(**{**kw, **overrides})


def make_model(root, config=None, seed: int = 0, name: str = "model") -> Path:
    config = config or vision_config()
    path = write_checkpoint(root, config, random_tensors(config, seed=seed), name=name)
    write_tiny_tokenizer(path, config.vocab_size)
    return path


def conversation(qa, with_image: bool = True) -> list:
    conv = []
    for j, (_, q, a) in enumerate(qa):
        conv += [{"from": "human", "value": ("<image>\n" if with_image and j == 0 else "") + q},
                 {"from": "gpt", "value": a}]
    return conv


def write_shapes_jsonl(directory, n: int = 24, seed: int = 0, text_rows: int = 4, name: str = "train.jsonl",
                       split: str = "train", qpi: int = 2, sizes=None) -> Path:
    """``n`` image rows (PNG files in ``images/``) plus ``text_rows`` text-only rows.

    ``sizes``: a list of (width, height) to resize images to, cycled (anyres tests)."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(shapes.make_samples(split, n, seed=seed, questions_per_image=qpi, size=32,
                                              max_objects=2)):
        img = s.image if not sizes else s.image.resize(sizes[i % len(sizes)])
        rel = f"images/{split}-{seed}-{i}.png"
        img.save(directory / rel)
        lines.append({"image": rel, "conversations": conversation(s.qa)})
        if text_rows and i % max(1, n // text_rows) == 0 and sum("image" not in r for r in lines) < text_rows:
            lines.append({"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}]})
    path = directory / name
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path
