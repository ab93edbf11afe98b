"""Tiny checkpoints in the exact layout the official p-MoD code (MCG-NJU/p-MoD) saves.

``make_official_checkpoint(dir, config, tensors_pmod, layout, dtype)`` writes what
``PmodLlavaLlamaForCausalLM.save_pretrained`` would: ``config.json`` with the official
keys (no ``mod_decay_span``: the official code hard-codes D = 31), MoD layers as
``ModLayer`` wrappers (``model.layers.N.decoder_layer.*`` and
``model.layers.N.router.router.*``), the LLaVA projector as ``model.mm_projector.0/2``,
``model.image_newline``, a ``rotary_emb.inv_freq`` buffer per layer, a few CLIP
vision-tower tensors, and a tiny tokenizer that ``transformers.AutoTokenizer`` loads.
Weights are written with torch (``safetensors.torch.save_file`` / ``torch.save``).

The official <- pmod name mapping here is written independently of ``pmod.convert``
so that the converter is checked against it, not against itself.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
from builders import TINY

from pmod.config import PmodConfig
from pmod.format import expected_tensors

LAYOUTS = ("safetensors", "safetensors-sharded", "bin", "bin-sharded")
DTYPES = ("float32", "float16", "bfloat16")

#: LLaVA-NeXT's anyres grid (the released p-MoD-LLaVA-NeXT config).
GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

#: The p-MoD-LLaVA-NeXT shape scaled down: ``builders.TINY`` with 32 layers (so the official
#: D = 31 schedule is the real one: layers 8..31 are MoD layers), vocabulary 96, LLaVA-NeXT
#: multimodal keys.
TINY_OFFICIAL = dict(
    TINY,
    vocab_size=96,
    num_hidden_layers=32,
    mod_target_token_type="vision_hr",
    mod_decay_span=31,
    mm_projector_type="mlp2x_gelu",
    mm_hidden_size=24,
    mm_vision_tower="openai/clip-vit-large-patch14-336",
    mm_patch_merge_type="spatial_unpad",
    image_aspect_ratio="anyres",
    image_grid_pinpoints=GRID_PINPOINTS,
)

# A few tensors of the CLIP ViT-L/14-336 tower as LLaVA saves it, scaled down.
VISION_TOWER = {
    "model.vision_tower.vision_tower.vision_model.embeddings.class_embedding": (24,),
    "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight": (24, 3, 14, 14),
    "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight": (5, 24),
    "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight": (24,),
    "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": (24, 24),
}


def tiny_official_config(**overrides) -> PmodConfig:
    """The pmod config of the tiny official model (``TINY_OFFICIAL`` with overrides)."""
    return PmodConfig(**{**TINY_OFFICIAL, **overrides})


def random_pmod_tensors(config: PmodConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 pmod-named weights for every tensor ``config`` calls for."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_tensors(config).items():
        if name.endswith("norm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 2:
            a = rng.standard_normal(shape) / math.sqrt(shape[-1])
        else:
            a = 0.1 * rng.standard_normal(shape)
        out[name] = a.astype(np.float32)
    return out


# ----------------------------------------------------------------------------- config
def official_config_dict(config: PmodConfig | dict, wrapped_layers=None, dtype: str = "bfloat16") -> dict:
    """The config.json the official code writes for a model with this config.

    ``mod_decay_span`` is left out when it is the official 31 (official configs never
    have it); any other value is kept, as a hand-edited official config would.
    """
    c = config.to_dict() if isinstance(config, PmodConfig) else dict(config)
    multimodal = c.get("mm_projector_type") is not None
    d = {
        "_name_or_path": "./checkpoints/p-mod-llava-next-tiny",
        "architectures": ["PmodLlavaLlamaForCausalLM"],
        "attention_bias": c.get("attention_bias", False),
        "attention_dropout": 0.0,
        "bos_token_id": c.get("bos_token_id", 1),
        "eos_token_id": c.get("eos_token_id", 2),
        "hidden_act": "silu",
        "hidden_size": c["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": c["intermediate_size"],
        "max_position_embeddings": c.get("max_position_embeddings", 4096),
        "mlp_bias": c.get("mlp_bias", False),
        "model_type": "pmod_llava_llama",
        "num_attention_heads": c["num_attention_heads"],
        "num_hidden_layers": c["num_hidden_layers"],
        "num_key_value_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": c.get("rms_norm_eps", 1e-6),
        "rope_scaling": c.get("rope_scaling"),
        "rope_theta": c.get("rope_theta", 10000.0),
        "tie_word_embeddings": c.get("tie_word_embeddings", False),
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
        "torch_dtype": dtype,
        "transformers_version": "4.37.2",
        "use_cache": True,
        "vocab_size": c["vocab_size"],
    }
    if c.get("head_dim") not in (None, c["hidden_size"] // c["num_attention_heads"]):
        d["head_dim"] = c["head_dim"]
    if c.get("pad_token_id") is not None:
        d["pad_token_id"] = c["pad_token_id"]
    if multimodal:
        d.update({
            "freeze_mm_mlp_adapter": False,
            "image_aspect_ratio": c.get("image_aspect_ratio", "anyres"),
            "image_crop_resolution": 224,
            "image_split_resolution": 224,
            "mm_hidden_size": c["mm_hidden_size"],
            "mm_patch_merge_type": c.get("mm_patch_merge_type", "spatial_unpad"),
            "mm_projector_lr": None,
            "mm_projector_type": c["mm_projector_type"],
            "mm_resampler_type": None,
            "mm_use_im_patch_token": False,
            "mm_use_im_start_end": False,
            "mm_vision_select_feature": c.get("mm_vision_select_feature", "patch"),
            "mm_vision_select_layer": c.get("mm_vision_select_layer", -2),
            "mm_vision_tower": c.get("mm_vision_tower") or "openai/clip-vit-large-patch14-336",
            "tune_mm_mlp_adapter": False,
            "tune_mm_vision_resampler": False,
            "unfreeze_mm_vision_tower": False,
            "use_mm_proj": True,
        })
    if multimodal and c.get("image_grid_pinpoints") is not None:  # LLaVA-1.5 configs lack it
        d["image_grid_pinpoints"] = c["image_grid_pinpoints"]
    if c.get("mod_target_layers") is not None:
        d.update({
            "mod_bias_enabled": c.get("mod_bias_enabled", True),
            "mod_router_factor": c.get("mod_router_factor", 0.5),
            "mod_special_init": True,
            "mod_target_layers": c["mod_target_layers"],
            "mod_target_token_type": c.get("mod_target_token_type", "vision_hr"),
            "mod_weight_norm": c.get("mod_weight_norm", "tanh_0.2_1"),
        })
        if wrapped_layers is not None:
            d["mod_target_layer_indices"] = sorted(wrapped_layers)
        span = c.get("mod_decay_span")
        if span is not None and not (span == 31 and "_decay_" in c["mod_target_layers"]):
            d["mod_decay_span"] = span
    else:
        d["model_type"] = "llava_llama" if multimodal else "llama"
        d["architectures"] = ["LlavaLlamaForCausalLM" if multimodal else "LlamaForCausalLM"]
    return dict(sorted(d.items()))


# ------------------------------------------------------------------------ name mapping
def official_state_dict(tensors_pmod: dict[str, np.ndarray], projector_type: str | None = "mlp2x_gelu",
                        head_dim: int | None = None, rope_theta: float = 10000.0,
                        vision_tower: bool = True) -> dict[str, np.ndarray]:
    """pmod-named tensors -> the official state dict, in the order HF saves it.

    A layer with a ``router.*`` tensor is written as an official ``ModLayer``.
    """
    wrapped = {int(m.group(1)) for n in tensors_pmod
               if (m := re.match(r"language_model\.layers\.(\d+)\.router\.", n))}
    layers: dict[int, dict[str, np.ndarray]] = {}
    top: dict[str, np.ndarray] = {}
    for name, arr in tensors_pmod.items():
        m = re.match(r"^language_model\.layers\.(\d+)\.(.+)$", name)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if rest.startswith("router."):
                off = f"model.layers.{i}.router.router.{rest[len('router.'):]}"
            elif i in wrapped:
                off = f"model.layers.{i}.decoder_layer.{rest}"
            else:
                off = f"model.layers.{i}.{rest}"
            layers.setdefault(i, {})[off] = arr
        elif name == "language_model.embed_tokens.weight":
            top["model.embed_tokens.weight"] = arr
        elif name == "language_model.norm.weight":
            top["model.norm.weight"] = arr
        elif name == "language_model.lm_head.weight":
            top["lm_head.weight"] = arr
        elif name == "image_newline":
            top["model.image_newline"] = arr
        elif (m := re.match(r"^projector\.linear_(\d)\.(weight|bias)$", name)):
            if projector_type == "linear":
                top[f"model.mm_projector.{m.group(2)}"] = arr
            else:  # nn.Sequential(Linear, GELU, Linear): indices 0 and 2
                seq_index = 0 if m.group(1) == "1" else 2
                top[f"model.mm_projector.{seq_index}.{m.group(2)}"] = arr
        else:
            raise KeyError(f"no official name for {name}")
    sd: dict[str, np.ndarray] = {}
    if "model.embed_tokens.weight" in top:
        sd["model.embed_tokens.weight"] = top.pop("model.embed_tokens.weight")
    for i in sorted(layers):
        sd.update(layers[i])
        if head_dim:  # the LLaMA rotary buffer old transformers versions saved
            prefix = f"model.layers.{i}.decoder_layer." if i in wrapped else f"model.layers.{i}."
            inv = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
            sd[prefix + "self_attn.rotary_emb.inv_freq"] = inv.astype(np.float32)
    if "model.norm.weight" in top:
        sd["model.norm.weight"] = top.pop("model.norm.weight")
    if vision_tower and projector_type is not None:
        rng = np.random.default_rng(123)
        for name, shape in VISION_TOWER.items():
            sd[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    for name in sorted(n for n in top if n.startswith("model.mm_projector")):
        sd[name] = top.pop(name)
    if "model.image_newline" in top:
        sd["model.image_newline"] = top.pop("model.image_newline")
    sd.update(top)  # lm_head last
    return sd


# ---------------------------------------------------------------------------- writing
def make_official_checkpoint(dir, config_dict, tensors_pmod: dict[str, np.ndarray],
                             layout: str = "safetensors", dtype: str = "float32", *,
                             extra: dict[str, np.ndarray] | None = None, drop=(),
                             vision_tower: bool = True, tokenizer: bool = True,
                             n_shards: int = 3) -> Path:
    """Write an official-layout checkpoint directory at ``dir`` and return its path.

    ``config_dict``: a :class:`PmodConfig` (turned into the official config.json by
    :func:`official_config_dict`) or a dict written as config.json as it is.
    ``tensors_pmod``: float32 arrays by pmod name; layers with routers are wrapped.
    ``layout``: one of ``LAYOUTS``; ``dtype``: the stored dtype (one of ``DTYPES``).
    ``extra`` adds official-named tensors, ``drop`` removes official names (to build
    broken checkpoints); ``vision_tower`` adds a few CLIP tensors; ``tokenizer`` writes
    the tiny tokenizer and generation_config.json.
    """
    import torch

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    if isinstance(config_dict, PmodConfig):
        c = config_dict
        wrapped = {int(m.group(1)) for n in tensors_pmod
                   if (m := re.match(r"language_model\.layers\.(\d+)\.router\.", n))}
        cfg = official_config_dict(c, wrapped, dtype)
        projector_type, head_dim, theta = c.mm_projector_type, c.head_dim, c.rope_theta
    else:
        cfg = dict(config_dict)
        projector_type = cfg.get("mm_projector_type", "linear" if "mm_vision_tower" in cfg else None)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        theta = cfg.get("rope_theta", 10000.0)
    (dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    sd_np = official_state_dict(tensors_pmod, projector_type, head_dim, theta, vision_tower)
    for name in drop:
        del sd_np[name]
    sd_np.update(extra or {})
    tdtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    sd = {}
    for name, arr in sd_np.items():
        t = torch.from_numpy(np.array(arr, copy=True))
        # Like save_pretrained after model.to(dtype): float parameters in the model dtype;
        # the rotary buffer is float32 in LLaMA.
        if t.is_floating_point() and not name.endswith("inv_freq"):
            t = t.to(tdtype)
        sd[name] = t.contiguous()

    if layout.startswith("safetensors"):
        from safetensors.torch import save_file

        if layout == "safetensors":
            save_file(sd, str(dir / "model.safetensors"), metadata={"format": "pt"})
        else:
            _write_sharded(dir, sd, n_shards, "model-{i:05d}-of-{n:05d}.safetensors",
                           "model.safetensors.index.json",
                           lambda part, path: save_file(part, str(path), metadata={"format": "pt"}))
    else:
        if layout == "bin":
            torch.save(sd, dir / "pytorch_model.bin")
        else:
            _write_sharded(dir, sd, n_shards, "pytorch_model-{i:05d}-of-{n:05d}.bin",
                           "pytorch_model.bin.index.json", lambda part, path: torch.save(part, path))
    if tokenizer:
        write_tiny_tokenizer(dir, int(cfg["vocab_size"]))
        (dir / "generation_config.json").write_text(json.dumps({
            "_from_model_config": True, "bos_token_id": cfg.get("bos_token_id", 1),
            "eos_token_id": cfg.get("eos_token_id", 2), "pad_token_id": 0,
            "transformers_version": "4.37.2"}, indent=2) + "\n")
    return dir


def _write_sharded(dir: Path, sd: dict, n: int, pattern: str, index_name: str, save) -> None:
    names = list(sd)
    n = max(1, min(n, len(names)))
    per = math.ceil(len(names) / n)
    weight_map = {}
    total = 0
    for k in range(n):
        fname = pattern.format(i=k + 1, n=n)
        part = {name: sd[name] for name in names[k * per:(k + 1) * per]}
        save(part, dir / fname)
        for name, t in part.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (dir / index_name).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


# --------------------------------------------------------------------------- tokenizer
WORDS = ("hello world the a an is of and to in what this image describe picture cat dog "
         "red blue green USER ASSISTANT : ? . , yes no").split()


def write_tiny_tokenizer(dir, vocab_size: int) -> None:
    """A word-level LLaMA-like tokenizer of exactly ``vocab_size`` tokens.

    ``<unk>`` = 0, ``<s>`` = 1 (prepended, like LLaMA), ``</s>`` = 2, then a few words
    and fillers ``w<i>``. Written as tokenizer.json + tokenizer_config.json +
    special_tokens_map.json, loadable with ``AutoTokenizer.from_pretrained(dir)``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    dir = Path(dir)
    tokens = ["<unk>", "<s>", "</s>"] + list(WORDS)
    tokens += [f"w{i}" for i in range(len(tokens), vocab_size)]
    vocab = {t: i for i, t in enumerate(tokens[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(str(dir / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **specials,
        "model_max_length": 4096, "padding_side": "right", "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


# ------------------------------------------------------------------------ vision tower
OFFICIAL_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."


def official_tower_state_dict(clip_tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CLIP vision tensors (``CLIPVisionModel`` names, with or without ``vision_model.``) under the
    names LLaVA's ``CLIPVisionTower`` saves them (``model.vision_tower.vision_tower.vision_model.*``).

    Pass them as ``extra=`` to :func:`make_official_checkpoint` with ``vision_tower=False`` for
    a checkpoint that carries its whole tower (``unfreeze_mm_vision_tower``).
    """
    return {OFFICIAL_TOWER_PREFIX + (k[len("vision_model."):] if k.startswith("vision_model.") else k): v
            for k, v in clip_tensors.items()}
