"""Tiny llava-hf checkpoints and CLIP towers saved by transformers itself (for convert and e2e tests).

``make_hf_llava(dir, kind="1.5" | "next", seed=0, **overrides)`` builds a random
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` (tiny CLIP tower,
tiny LLaMA decoder, every parameter random, biases and norms included), saves it with
``save_pretrained`` and adds what a llava-hf repository has next to it: a tokenizer whose
``<image>`` token id is the config's ``image_token_index``, the image processor's
``preprocessor_config.json``, and (transformers 5 style) ``processor_config.json`` +
``chat_template.jinja``. The directory loads with ``AutoProcessor.from_pretrained`` and
``Llava(Next)ForConditionalGeneration.from_pretrained``.

``make_clip_tower(dir, ...)`` saves a tiny ``CLIPVisionModel`` (or full ``CLIPModel``) for
``pmod convert --vision-tower``.

Both can rewrite the tensor names into the other naming schemes transformers has used
(``KEY_STYLES``), which transformers 5 still loads.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

#: The tiny CLIP tower: 3 layers (LLaVA's select layer -2 uses 2), 28 px = 2 x 2 patches of 14.
TINY_VISION = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   image_size=28, patch_size=14, num_channels=3, hidden_act="quick_gelu",
                   layer_norm_eps=1e-5, projection_dim=16)
#: The tiny LLaMA decoder; 128 rows of embeddings (the tokenizer has 98 tokens, padded like llava-hf).
TINY_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                 tie_word_embeddings=False)
#: LLaVA-NeXT grid for the 28 px tower, as transformers reads it: [height, width] pairs.
#: Not symmetric on purpose, so a converter that forgets to swap to [width, height] fails.
NEXT_PINPOINTS = [[28, 56], [56, 56], [84, 28]]
IMAGE_TOKEN = "<image>"

#: Tensor naming schemes of llava-hf checkpoints:
#: "saved": what this transformers' save_pretrained writes (5.x: language_model.model.*,
#:    language_model.lm_head, vision_tower.* without vision_model., multi_modal_projector.*);
#: "legacy": transformers 4 before 4.52 (language_model.model.*, vision_tower.vision_model.*);
#: "prefixed": transformers 4.52+ (model.language_model.*, lm_head, model.vision_tower.vision_model.*);
#: "state_dict": transformers 5 module names (model.language_model.*, model.vision_tower.*).
KEY_STYLES = ("saved", "legacy", "prefixed", "state_dict")

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def randomize(model, seed: int = 0):
    """Every parameter random (HF's init leaves norms at 1 and biases at 0)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name or "layrnorm" in name:
                p.copy_(1.0 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif p.ndim >= 2:
                p.copy_(r / math.sqrt(int(np.prod(p.shape[1:]))))
            else:  # class embedding, image_newline
                p.copy_(r)
    return model


# ----------------------------------------------------------------------------- tokenizer
def write_llava_tokenizer(dir, vocab_size: int = 97) -> int:
    """tests/tiny_tokenizer's BPE tokenizer plus a special ``<image>`` token; returns its id."""
    from tiny_tokenizer import write_tiny_tokenizer
    from tokenizers import AddedToken, Tokenizer

    dir = Path(dir)
    write_tiny_tokenizer(dir, vocab_size)
    tok = Tokenizer.from_file(str(dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    tok.save(str(dir / "tokenizer.json"))
    cfg = json.loads((dir / "tokenizer_config.json").read_text())
    cfg.update(pad_token="<unk>", image_token=IMAGE_TOKEN, extra_special_tokens={"image_token": IMAGE_TOKEN})
    (dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    return tok.token_to_id(IMAGE_TOKEN)


# ------------------------------------------------------------------------------ llava-hf
def image_processor(kind: str, vision: dict, pinpoints=None):
    """'llava' (LLaVA-1.5: pad to square), 'clip' (resize + center crop) or 'next' (anyres)."""
    transformers = _quiet()
    size = vision["image_size"]
    kw = dict(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    def cls(name):
        return getattr(transformers, name + "Pil", None) or getattr(transformers, name)
    if kind == "llava":
        return cls("LlavaImageProcessor")(do_pad=True, **kw)
    if kind == "clip":
        return cls("CLIPImageProcessor")(**kw)
    if kind == "next":
        return cls("LlavaNextImageProcessor")(image_grid_pinpoints=pinpoints, **kw)
    raise ValueError(f"image processor kind must be llava, clip or next, got {kind!r}")


def make_hf_llava(dir, kind: str = "1.5", seed: int = 0, *, text: dict | None = None,
                  vision: dict | None = None, processor: str | None = "default",
                  processor_files: str = "both", key_style: str = "saved", dtype: str = "float32",
                  max_shard_size: str | None = None, **overrides) -> Path:
    """Save a tiny random llava-hf model at ``dir`` (created) and return ``dir``.

    ``kind``: "1.5" (LlavaForConditionalGeneration) or "next" (LlavaNextForConditionalGeneration).
    ``text`` / ``vision``: overrides of ``TINY_TEXT`` / ``TINY_VISION``. ``overrides``: top-level
    Llava(Next)Config keys (``vision_feature_layer`` defaults to -2, ``image_grid_pinpoints`` to
    ``NEXT_PINPOINTS``, ``image_token_index`` to the tokenizer's ``<image>`` id).
    ``processor``: the image processor ("llava", "clip", "next", None for none; "default":
    "llava" for 1.5, "next" for NeXT). ``processor_files``: "preprocessor" (the image
    processor's preprocessor_config.json, as transformers 4 repos have), "processor"
    (``Llava(Next)Processor.save_pretrained``: processor_config.json, chat_template.jinja and
    the tokenizer, transformers 5 style), or "both". ``key_style``: one of ``KEY_STYLES``.
    ``dtype``: float32, float16 or bfloat16. ``max_shard_size`` shards the safetensors
    (``key_style="saved"`` only).
    """
    import torch

    transformers = _quiet()
    if kind not in ("1.5", "next"):
        raise ValueError(f"kind must be '1.5' or 'next', got {kind!r}")
    if key_style not in KEY_STYLES:
        raise ValueError(f"key_style must be one of {KEY_STYLES}")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    image_id = write_llava_tokenizer(dir)
    vision = {**TINY_VISION, **(vision or {})}
    text = {**TINY_TEXT, **(text or {})}
    top = dict(image_token_index=image_id, vision_feature_layer=-2)
    if kind == "next":
        top["image_grid_pinpoints"] = NEXT_PINPOINTS
    top.update(overrides)
    cfg_cls, model_cls = ((transformers.LlavaConfig, transformers.LlavaForConditionalGeneration) if kind == "1.5"
                          else (transformers.LlavaNextConfig, transformers.LlavaNextForConditionalGeneration))
    config = cfg_cls(text_config=transformers.LlamaConfig(**text),
                     vision_config=transformers.CLIPVisionConfig(**vision), **top)
    torch.manual_seed(seed)
    model = randomize(model_cls(config).eval(), seed)
    model = model.to({"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype])
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dir, **kw)
    if key_style != "saved":
        from safetensors.torch import save_file

        for f in list(dir.glob("model*.safetensors")) + list(dir.glob("model.safetensors.index.json")):
            f.unlink()
        state = {restyle(k, key_style): v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(dir / "model.safetensors"), metadata={"format": "pt"})

    if processor == "default":
        processor = "llava" if kind == "1.5" else "next"
    if processor is not None:
        ip = image_processor(processor, vision, top.get("image_grid_pinpoints"))
        if processor_files in ("processor", "both"):
            tok = transformers.AutoTokenizer.from_pretrained(str(dir))
            proc_cls = transformers.LlavaProcessor if kind == "1.5" else transformers.LlavaNextProcessor
            proc = proc_cls(image_processor=ip, tokenizer=tok, patch_size=vision["patch_size"],
                            vision_feature_select_strategy=config.vision_feature_select_strategy,
                            chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
            proc.save_pretrained(str(dir))
        if processor_files in ("preprocessor", "both"):
            ip.save_pretrained(str(dir))
    return dir


def restyle(name: str, style: str) -> str:
    """A transformers-5 llava state_dict name in naming scheme ``style`` (see ``KEY_STYLES``)."""
    if style == "state_dict":
        return name
    if style == "prefixed":
        return re.sub(r"^model\.vision_tower\.", "model.vision_tower.vision_model.", name)
    if style == "legacy":
        name = re.sub(r"^model\.language_model\.", "language_model.model.", name)
        name = re.sub(r"^lm_head\.", "language_model.lm_head.", name)
        name = re.sub(r"^model\.vision_tower\.", "vision_tower.vision_model.", name)
        return re.sub(r"^model\.", "", name)
    raise ValueError(f"no naming scheme {style!r}")


def load_hf_llava(dir):
    """The saved model back through transformers (float32, eval)."""
    transformers = _quiet()
    cfg = json.loads((Path(dir) / "config.json").read_text())
    cls = (transformers.LlavaNextForConditionalGeneration if cfg["model_type"] == "llava_next"
           else transformers.LlavaForConditionalGeneration)
    return cls.from_pretrained(str(dir), dtype="float32").eval()


# ---------------------------------------------------------------------------- CLIP towers
def make_clip_tower(dir, seed: int = 0, *, full: bool = False, style: str = "saved",
                    fmt: str = "safetensors", processor: bool = True, **vision) -> Path:
    """Save a tiny random CLIP tower at ``dir`` (created) for ``--vision-tower``; return ``dir``.

    ``full``: a whole ``CLIPModel`` (text tower too, config with nested ``vision_config``)
    instead of a ``CLIPVisionModel``. ``style``: "saved" (what this transformers writes; 5.x
    drops CLIPVisionModel's ``vision_model.`` prefix) or "legacy" (every vision tensor under
    ``vision_model.``, as transformers 4 saved it). ``fmt``: "safetensors" or "bin"
    (``pytorch_model.bin``). ``processor`` adds a CLIPImageProcessor preprocessor_config.json.
    ``vision``: overrides of ``TINY_VISION``.
    """
    import torch

    transformers = _quiet()
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    v = {**TINY_VISION, **vision}
    torch.manual_seed(seed)
    if full:
        text = transformers.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=64, max_position_embeddings=16,
                                           projection_dim=v["projection_dim"], bos_token_id=0, eos_token_id=1,
                                           pad_token_id=1)
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=text.to_dict(), vision_config=v, projection_dim=v["projection_dim"]))
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**v))
    model = randomize(model.eval(), seed)
    model.save_pretrained(str(dir))
    if style == "legacy" or fmt == "bin":
        state = {k: t.detach().contiguous() for k, t in model.state_dict().items()}
        if style == "legacy" and not full:
            state = {k if k.startswith("vision_model.") else "vision_model." + k: t for k, t in state.items()}
        (dir / "model.safetensors").unlink()
        if fmt == "bin":
            torch.save(state, dir / "pytorch_model.bin")
        else:
            from safetensors.torch import save_file

            save_file(state, str(dir / "model.safetensors"), metadata={"format": "pt"})
    if processor:
        image_processor("clip", v).save_pretrained(str(dir))
    return dir


def clip_vision_state(dir) -> dict[str, np.ndarray]:
    """A saved tower's vision tensors as float32 numpy, by CLIPVisionModel name without
    ``vision_model.`` (loaded back through transformers)."""
    transformers = _quiet()
    cfg = json.loads((Path(dir) / "config.json").read_text())
    if cfg["model_type"] == "clip":
        module = transformers.CLIPModel.from_pretrained(str(dir)).vision_model
    else:
        module = transformers.CLIPVisionModel.from_pretrained(str(dir))
    out = {}
    for k, t in module.state_dict().items():
        k = k.removeprefix("vision_model.")
        if t.is_floating_point():
            out[k] = t.float().numpy()
    return out
