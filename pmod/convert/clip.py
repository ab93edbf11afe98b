"""The CLIP vision tower: its config, its tensor names, and a Hugging Face CLIP directory.

A llava-hf checkpoint carries its tower; an official p-MoD / LLaVA checkpoint usually
does not (the official code loads ``mm_vision_tower`` at run time), so ``pmod convert
--vision-tower CLIP_DIR`` reads a ``CLIPVisionModel`` / ``CLIPModel`` directory
(:func:`read_clip_tower`). Both keep only what LLaVA runs (:func:`tower_tensor_name`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pmod.config import PmodConfig, VisionConfig
from pmod.convert.sources import SourceTensor, processor_source, read_source_tensors
from pmod.errors import PmodError
from pmod.jsonfile import read_json_object
from pmod.format import vision_layers_used

#: A CLIP vision tensor name inside the tower (after any ``vision_model.`` prefix).
_CLIP_PART_RE = re.compile(r"^(?:embeddings|encoder|pre_layrnorm|post_layernorm)\.")


def is_clip_tensor(rest: str) -> bool:
    """Whether ``rest`` names a ``CLIPVisionModel`` tensor (without ``vision_model.``)."""
    return bool(_CLIP_PART_RE.match(rest))


def tower_tensor_name(rest: str, config: PmodConfig) -> str | None:
    """``vision_tower.<rest>`` for a ``CLIPVisionModel`` tensor ``<rest>`` (no ``vision_model.``),
    or None for what LLaVA never runs: ``post_layernorm``, encoder layers past
    ``mm_vision_select_layer``, the ``position_ids`` buffer."""
    if rest.startswith("post_layernorm.") or rest.endswith("position_ids"):
        return None
    m = re.match(r"^encoder\.layers\.(\d+)\.", rest)
    if m and int(m.group(1)) >= vision_layers_used(config):
        return None
    return "vision_tower." + rest


def check_tower_fits(config: PmodConfig, tower: str, cfg: str, shown_pins=None) -> None:
    """The tower's layers cover ``mm_vision_select_layer``; anyres tiles are whole tower images.

    ``tower`` and ``cfg`` name the tower and the config file in messages; ``shown_pins``: the
    pinpoints as the source config writes them (for the message)."""
    v = config.vision_config
    try:
        vision_layers_used(config)
    except PmodError:
        raise PmodError(
            f"{cfg} has mm_vision_select_layer = {config.mm_vision_select_layer} but {tower} has only "
            f"{v.num_hidden_layers} layers: is this the right tower?") from None
    pins = config.image_grid_pinpoints
    if (config.image_aspect_ratio or "").startswith("anyres") and isinstance(pins, list):
        size = v.image_size
        bad = [p for p in pins if not (isinstance(p, (list, tuple)) and all(
            isinstance(x, int) and x > 0 and x % size == 0 for x in p))]
        if bad:
            raise PmodError(
                f"{cfg} has image_grid_pinpoints {shown_pins or pins} but {tower} has image_size {size}: the anyres "
                f"resolutions (e.g. {list(bad[0]) if isinstance(bad[0], (list, tuple)) else bad[0]}) must be "
                "multiples of the tower's image size; is this the right tower?")


# ---------------------------------------------------------------------- --vision-tower
@dataclass
class ClipTower:
    """A Hugging Face CLIP directory given with ``--vision-tower``: its vision config now,
    its weights (headers only, memory-mapped) when asked."""

    path: Path
    vision_config: VisionConfig

    def tensors(self) -> dict[str, SourceTensor]:
        """The tower's tensors by ``CLIPVisionModel`` name without ``vision_model.``."""
        out: dict[str, SourceTensor] = {}
        for name, t in read_source_tensors(self.path).items():
            rest = name[len("vision_model."):] if name.startswith("vision_model.") else name
            if is_clip_tensor(rest):
                out[rest] = t
        if not out:
            raise PmodError(
                f"vision tower {self.path} holds no CLIP vision tensors (vision_model.embeddings.*, "
                "vision_model.encoder.layers.*): pass a CLIPVisionModel or CLIPModel directory")
        return out

    def processor(self) -> "Path | dict | None":
        """Its image processor config: the preprocessor_config.json file, else processor_config.json's
        ``image_processor`` object, else None."""
        return processor_source(self.path)


def read_clip_tower(path) -> ClipTower:
    """Read a ``CLIPVisionModel`` / ``CLIPModel`` directory's config (weights are read later)."""
    path = Path(path)
    if not path.exists():
        raise PmodError(f"vision tower {path} does not exist: pass a Hugging Face CLIP directory "
                        "(e.g. a download of openai/clip-vit-large-patch14-336)")
    if not path.is_dir():
        raise PmodError(f"vision tower {path} is not a directory: pass the Hugging Face CLIP directory "
                        "that holds config.json and the weights")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise PmodError(f"vision tower {path} has no config.json: pass a Hugging Face CLIPVisionModel or "
                        "CLIPModel directory (e.g. a download of openai/clip-vit-large-patch14-336)")
    d = read_json_object(cfg, "re-download the vision tower")
    kind = d.get("model_type")
    if kind == "clip":  # a full CLIPModel: the tower's keys are nested (old configs: *_dict too)
        v = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        return ClipTower(path, VisionConfig.from_dict({**v, "model_type": "clip_vision_model"}, f"{cfg} vision_config"))
    if kind == "clip_vision_model":
        return ClipTower(path, VisionConfig.from_dict(d, str(cfg)))
    what = f"model_type {kind!r}" if "model_type" in d else "no 'model_type'"
    raise PmodError(f"vision tower {cfg} has {what}: --vision-tower takes a CLIP tower "
                    "(a CLIPVisionModel or CLIPModel directory, model_type 'clip_vision_model' or 'clip')")
