"""transformers' llava-hf layout: ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration.save_pretrained`` (``model_type`` ``llava`` /
``llava_next``), with transformers 4 or 5 tensor names.

Such a checkpoint is a dense LLaVA-1.5 / LLaVA-NeXT with its CLIP tower: its
``config.json`` nests the text model's keys in ``text_config`` (often only those away
from transformers' defaults) and the tower's in ``vision_config``. Tensors live under
``language_model.model.*`` (transformers 4) or ``model.language_model.*`` (5), the
projector is ``multi_modal_projector.linear_{1,2}``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

from pmod.config import PmodConfig
from pmod.convert.check import checked_tensors
from pmod.config import VisionConfig
from pmod.convert.clip import check_tower_fits, is_clip_tensor, tower_tensor_name
from pmod.convert.sources import SourceTensor, read_image_processor
from pmod.convert.text_names import TextTensor, read_text_tensor, recomputed_buffer, text_names
from pmod.errors import PmodError
from pmod.format import vision_layers_used

#: model_type values of transformers' llava-hf layout (LLaVA-1.5, LLaVA-NeXT).
HF_MODEL_TYPES = ("llava", "llava_next")
#: transformers' LlamaConfig defaults (llava-hf text_configs often omit keys at their default).
LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      hidden_act="silu", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
#: LlavaConfig's tower when config.json has no vision_config (CLIP ViT-L/14 at 336).
LLAVA_VISION_DEFAULT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                            num_attention_heads=16, image_size=336, patch_size=14)
#: LlavaNextConfig's default image_grid_pinpoints ([height, width] as transformers reads them).
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
_SELECT_STRATEGY = {"default": "patch", "full": "cls_patch"}

# The text model's prefix; what follows is its name in ``<Family>ForCausalLM.model``.
_HF_TEXT_RE = re.compile(r"^((?:model\.)?language_model\.(?:model\.)?)(.+)$")
_HF_TOWER_RE = re.compile(r"^((?:model\.)?vision_tower\.(?:vision_model\.)?)(.+)$")
_HF_PROJECTOR_RE = re.compile(r"^((?:model\.)?multi_modal_projector\.)linear_([12])\.(weight|bias)$")
_HF_LM_HEAD = ("lm_head.weight", "language_model.lm_head.weight")
_HF_NEWLINE = ("image_newline", "model.image_newline")


def hf_llava_config(d: dict, src: Path) -> PmodConfig:
    """The dense :class:`PmodConfig` of a llava-hf ``config.json`` (``llava`` / ``llava_next``)."""
    src = Path(src)
    path = src / "config.json"
    model_type = d["model_type"]
    text = d.get("text_config")
    if text is None:
        text = {}
    if not isinstance(text, dict):
        raise PmodError(f"{path}: 'text_config' must be an object")
    text_type = text.get("model_type", "llama")
    if text_type != "llama":
        raise PmodError(f"{path} has text_config model_type {text_type!r}: pmod runs LLaMA decoders "
                        "(llava-hf checkpoints built on Vicuna / LLaMA, text_config model_type 'llama')")
    t = {**LLAMA_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k == "pad_token_id"}}
    for key in ("pad_token_id", "tie_word_embeddings"):  # older configs keep these at the top level
        if key not in text and d.get(key) is not None:
            t[key] = d[key]
    vraw = d.get("vision_config")
    where = f"{path} vision_config"
    vision = VisionConfig.from_dict({**LLAVA_VISION_DEFAULT, "model_type": "clip_vision_model"} if vraw is None
                                    else vraw, where)

    layer = d.get("vision_feature_layer", -2)
    if isinstance(layer, (list, tuple)):
        raise PmodError(f"{path} has vision_feature_layer = {list(layer)} (features of several layers, "
                        "concatenated): not supported, pmod takes the features of one layer (an int)")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise PmodError(f"{path}: vision_feature_layer must be an integer, got {layer!r}")
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy not in _SELECT_STRATEGY:
        raise PmodError(f"{path} has vision_feature_select_strategy {strategy!r}: expected 'default' "
                        "(patch features, CLS dropped) or 'full'")
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise PmodError(f"{path} has projector_hidden_act {act!r}: pmod's projector is LLaVA's mlp2x_gelu "
                        "(Linear, exact GELU 'gelu', Linear)")
    if d.get("multimodal_projector_bias", True) is not True:
        raise PmodError(f"{path} has multimodal_projector_bias = {d.get('multimodal_projector_bias')!r}: "
                        "pmod's mlp2x_gelu projector has biases (multimodal_projector_bias true)")

    processor = read_image_processor(src)
    if model_type == "llava_next":
        pins = d.get("image_grid_pinpoints", LLAVA_NEXT_PINPOINTS)
        if not (isinstance(pins, list) and pins and all(
                isinstance(p, (list, tuple)) and len(p) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in p) for p in pins)):
            raise PmodError(f"{path}: image_grid_pinpoints must be a list of [height, width] pairs, got {pins!r}")
        proc_pins = processor.get("image_grid_pinpoints") if processor else None
        if proc_pins is not None and [list(p) for p in proc_pins] != [list(p) for p in pins]:
            raise PmodError(f"{path} has image_grid_pinpoints {pins} but the image processor config has "
                            f"{proc_pins}: they must agree (pmod uses one list for tiling and packing)")
        mm = dict(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                  # transformers reads a pinpoint as [height, width], the official code (and pmod)
                  # as [width, height]: swapped, the same resolutions in the same order
                  image_grid_pinpoints=[[int(p[1]), int(p[0])] for p in pins])
    else:
        # LlavaImageProcessor's do_pad is LLaVA-1.5's pad-to-square (LlavaNext's means another thing)
        pad = bool(processor and processor.get("do_pad") and
                   str(processor.get("image_processor_type", "")).startswith("LlavaImageProcessor"))
        if processor is None:
            print(f"pmod: warning: {src} has no preprocessor_config.json (or processor_config.json): "
                  "images will be resized and center-cropped (image_aspect_ratio 'square'); official "
                  "LLaVA-1.5 pads them to a square (set image_aspect_ratio to 'pad' in the converted "
                  "config.json for that)", file=sys.stderr)
        mm = dict(image_aspect_ratio="pad" if pad else "square", mm_patch_merge_type="flat",
                  image_grid_pinpoints=None)
    cfg = {
        **t, **mm,
        "mod_target_layers": None, "mod_decay_span": None,
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": vision.hidden_size,
        "mm_vision_select_layer": layer, "mm_vision_select_feature": _SELECT_STRATEGY[strategy],
        "mm_vision_tower": None, "vision_config": vision,
        "mm_use_im_start_end": False,
    }
    try:
        config = PmodConfig.from_dict(cfg)
    except PmodError as e:
        raise PmodError(f"{path}: {e}") from None
    try:
        vision_layers_used(config)
    except PmodError:
        raise PmodError(f"{path} has vision_feature_layer = {layer} but its vision tower has "
                        f"{vision.num_hidden_layers} layers") from None
    if model_type == "llava_next":
        check_tower_fits(config, "its vision_config", str(path), shown_pins=pins)
    return config




def _hf_text_tensor(name: str, config: PmodConfig) -> TextTensor | None:
    """A llava-hf tensor of the text model, read under its ``<Family>ForCausalLM`` name; None: not one."""
    if name in _HF_LM_HEAD:
        return read_text_tensor("lm_head.weight", config)
    m = _HF_TEXT_RE.match(name)
    return read_text_tensor("model." + m.group(2), config) if m else None


def _hf_multimodal_name(name: str, config: PmodConfig) -> str | None:
    """The pmod name of a llava-hf tensor outside the text model (None: dropped); raises
    PmodError for a name that belongs to no known part of the model."""
    if name in _HF_NEWLINE:
        return "image_newline"
    m = _HF_PROJECTOR_RE.match(name)
    if m:
        return f"projector.linear_{m.group(2)}.{m.group(3)}"
    m = _HF_TOWER_RE.match(name)
    if m and is_clip_tensor(m.group(2)):
        return tower_tensor_name(m.group(2), config)
    raise PmodError(f"unknown tensor '{name}': not part of a llava-hf LLaVA / LLaVA-NeXT model with a "
                    "LLaMA decoder and a CLIP tower; is this the right checkpoint?")


def map_hf_tensors(source: dict[str, SourceTensor], config: PmodConfig,
                   src: Path | str = "") -> dict[str, SourceTensor]:
    """Rename a llava-hf checkpoint's tensors to pmod names and check them against the config."""
    L = config.num_hidden_layers
    mapped: dict[str, SourceTensor] = {}
    for name, t in source.items():
        if recomputed_buffer(name):
            continue
        text = _hf_text_tensor(name, config)
        new = _hf_multimodal_name(name, config) if text is None else text.pmod
        if new is None:
            continue
        if text is not None and text.layer is not None and text.layer >= L:
            raise PmodError(f"tensor '{name}' belongs to layer {text.layer} but config.json has "
                            f"text_config num_hidden_layers = {L}; is this the right config.json?")
        if new in mapped:
            raise PmodError(f"tensors '{mapped[new].name}' and '{name}' are the same weight under two "
                            "naming schemes; re-save the checkpoint")
        mapped[new] = t
    return checked_tensors(mapped, config, src, _hf_namer(source, config))


def _hf_namer(source, config: PmodConfig) -> Callable[[str], str]:
    """pmod name -> the llava-hf name in the naming scheme the source uses (for messages)."""
    def prefix(regex, default):
        return next((m.group(1) for n in source if n not in _HF_LM_HEAD and (m := regex.match(n))), default)
    text = prefix(_HF_TEXT_RE, "model.language_model.")
    top = "model." if text.startswith("model.") else ""
    tower = prefix(_HF_TOWER_RE, top + "vision_tower.")
    causal_lm_name = text_names(config).source_name

    def name(pmod: str) -> str:
        causal = causal_lm_name(pmod, ())
        if causal == "lm_head.weight":
            return "lm_head.weight" if top else "language_model.lm_head.weight"
        if causal is not None:
            return text + causal[len("model."):]
        if pmod.startswith("projector."):
            return top + "multi_modal_projector." + pmod[len("projector."):]
        if pmod.startswith("vision_tower."):
            return tower + pmod[len("vision_tower."):]
        return top + pmod
    return name
