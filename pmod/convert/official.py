"""The official p-MoD / LLaVA layout, as the official code saves it (MCG-NJU/p-MoD, LLaVA).

``config.json`` has ``model_type`` ``pmod_llava_llama`` (or ``llava_llama`` for a dense
LLaVA, or plain ``llama``); the text model is saved under its ``LlamaForCausalLM`` names
(``pmod.convert.text_names``, which also reads the official MoD-layer wrapper), next to
``model.mm_projector.*``, ``model.image_newline`` and, rarely, LLaVA's
``CLIPVisionTower`` (``model.vision_tower.vision_tower.vision_model.*``). A tower from
``--vision-tower`` is settled by :func:`attach_vision_tower`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

from pmod.config import _DECAY_RE, PmodConfig
from pmod.convert.check import checked_tensors
from pmod.convert.clip import ClipTower, check_tower_fits, tower_tensor_name
from pmod.convert.sources import SourceTensor
from pmod.convert.text_names import read_text_tensor, recomputed_buffer, text_names
from pmod.errors import PmodError
from pmod.format import vision_tensors
from pmod.schedule import mod_layers

#: model_type values pmod convert reads in the original LLaVA tensor layout.
MODEL_TYPES = ("pmod_llava_llama", "llava_llama", "llama")
#: The official code computes the shifted-cosine/linear schedule with a fixed D = 31.
OFFICIAL_DECAY_SPAN = 31
#: Where LLaVA's ``CLIPVisionTower`` keeps the CLIP model in an official state dict.
OFFICIAL_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
_NEWLINE = "model.image_newline"
_PROJECTOR_RE = re.compile(r"^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$")


def official_config(d: dict, src: Path) -> tuple[PmodConfig, bool]:
    """(config, whether the official ``mod_decay_span`` = 31 was supplied) of a ``config.json`` dict."""
    path = Path(src) / "config.json"
    d = dict(d)
    spec = d.get("mod_target_layers")
    span_defaulted = isinstance(spec, str) and bool(_DECAY_RE.match(spec)) and d.get("mod_decay_span") is None
    if span_defaulted:
        d["mod_decay_span"] = OFFICIAL_DECAY_SPAN
    if d.get("mm_vision_tower") is not None and d.get("mm_projector_type") is None:
        d["mm_projector_type"] = "linear"  # LLaVA's default when the key is absent
    try:
        return PmodConfig.from_dict(d), span_defaulted
    except PmodError as e:
        raise PmodError(f"{path}: {e}") from None


# -------------------------------------------------------------------------------- names
def vision_tower_name(official: str, config: PmodConfig) -> str | None:
    """The pmod name of an official vision-tower tensor (``model.vision_tower.*``), or None to drop it.

    Kept only when ``config`` has a ``vision_config`` (from ``--vision-tower``): then
    ``model.vision_tower.vision_tower.vision_model.<rest>`` becomes ``vision_tower.<rest>``,
    except what LLaVA never runs (see :func:`~pmod.convert.clip.tower_tensor_name`).
    """
    if config.vision_config is None or not official.startswith(OFFICIAL_TOWER_PREFIX):
        return None
    return tower_tensor_name(official[len(OFFICIAL_TOWER_PREFIX):], config)


def _multimodal_name(official: str, config: PmodConfig) -> str | None:
    """The pmod name of an official tensor outside the text model (None: dropped); raises
    PmodError for a name that belongs to no known part of the model."""
    if official.startswith("model.vision_tower."):
        return vision_tower_name(official, config)
    if official == _NEWLINE:
        return "image_newline"
    m = _PROJECTOR_RE.match(official)
    if m:
        slot = {"linear": {None: 1}, "mlp2x_gelu": {"0": 1, "2": 2}}.get(config.mm_projector_type, {})
        if m.group(1) in slot:
            return f"projector.linear_{slot[m.group(1)]}.{m.group(2)}"
    hint = f" (mm_projector_type {config.mm_projector_type!r})" if official.startswith("model.mm_projector") else ""
    raise PmodError(f"unknown tensor '{official}': not part of a p-MoD / LLaVA LLaMA model with this "
                    f"config.json{hint}; is this the right checkpoint?")


def official_name(pmod: str, wrapped: set[int], config: PmodConfig) -> str:
    """The official name of a pmod tensor (for messages); layers in ``wrapped`` are MoD wrappers."""
    text = text_names(config).source_name(pmod, wrapped)
    if text is not None:
        return text
    if pmod == "image_newline":
        return _NEWLINE
    m = re.match(r"^projector\.linear_(\d)\.(weight|bias)$", pmod)
    if m:
        if config.mm_projector_type == "linear":
            return f"model.mm_projector.{m.group(2)}"
        return f"model.mm_projector.{2 * (int(m.group(1)) - 1)}.{m.group(2)}"
    if pmod.startswith("vision_tower."):
        return OFFICIAL_TOWER_PREFIX + pmod[len("vision_tower."):]
    return pmod


def map_tensors(source: dict[str, SourceTensor], config: PmodConfig, src: Path | str = "",
                span_defaulted: bool = False, tower_src: Path | str | None = None) -> dict[str, SourceTensor]:
    """Rename the source tensors to pmod names and check them against the config.

    ``span_defaulted``: the config's ``mod_decay_span`` is the official default (for
    messages); ``tower_src``: where the vision tower's tensors come from (for messages;
    default ``src``).
    """
    L = config.num_hidden_layers
    mapped: dict[str, SourceTensor] = {}
    wrapped: dict[int, str] = {}
    plain: dict[int, str] = {}
    for name, t in source.items():
        if recomputed_buffer(name):
            continue
        text = read_text_tensor(name, config, mod_wrapper=True)
        new = _multimodal_name(name, config) if text is None else text.pmod
        if new is None:
            continue
        if text is not None and text.layer is not None:
            if text.layer >= L:
                raise PmodError(f"tensor '{name}' belongs to layer {text.layer} but config.json has "
                                f"num_hidden_layers = {L}; is this the right config.json?")
            (wrapped if text.wrapped else plain).setdefault(text.layer, name)
        mapped[new] = t
    both = sorted(set(wrapped) & set(plain))
    if both:
        i = both[0]
        raise PmodError(f"layer {i} has both wrapped ('{wrapped[i]}') and plain ('{plain[i]}') tensor "
                        "names; the checkpoint is inconsistent: re-download it")
    _check_mod_layers(set(wrapped), config, src, span_defaulted)
    return checked_tensors(mapped, config, src, lambda n: official_name(n, set(wrapped), config), tower_src)


def _check_mod_layers(wrapped: set[int], config: PmodConfig, src, span_defaulted: bool = False) -> None:
    """The layers the checkpoint wraps (those with routers) are the ones the schedule routes."""
    routed = set(mod_layers(config))
    if wrapped == routed:
        return
    parts = []
    extra = sorted(wrapped - routed)
    lacking = sorted(routed - wrapped)
    one = len(extra) == 1
    if extra and config.is_mod:
        parts.append(f"{_layers(extra)} {'has' if one else 'have'} routers but the schedule "
                     f"{config.mod_target_layers!r} makes {'it' if one else 'them'} dense")
    elif extra:
        parts.append(f"{_layers(extra)} {'has' if one else 'have'} routers but config.json has no "
                     "'mod_target_layers' (a dense model)")
    if lacking:
        one = len(lacking) == 1
        parts.append(f"{_layers(lacking)} {'lacks' if one else 'lack'} routers but the schedule "
                     f"{config.mod_target_layers!r} routes {'it' if one else 'them'}")
    keys = f"mod_target_layers = {config.mod_target_layers!r}"
    if config.is_mod:
        keys += f", mod_router_factor = {config.mod_router_factor}"
        if config.mod_decay_span:
            keys += f", mod_decay_span = {config.mod_decay_span}" + (
                " (the official default; config.json sets none)" if span_defaulted else "")
    keys += f", num_hidden_layers = {config.num_hidden_layers}"
    raise PmodError(
        f"MoD layers of {src or 'the checkpoint'} do not match config.json: " + "; ".join(parts)
        + f". Schedule keys: {keys}; fix them in config.json or use the config.json that came with these weights")


def _layers(idx: list[int]) -> str:
    return ("layer " if len(idx) == 1 else "layers ") + ", ".join(map(str, idx))


# ------------------------------------------------------------------------- vision tower
def attach_vision_tower(config: PmodConfig, source: dict[str, SourceTensor], src: Path,
                        clip: ClipTower | None) -> tuple[PmodConfig, dict[str, SourceTensor], Path]:
    """The official checkpoint's config and tensors with the vision tower settled.

    Without ``clip`` the checkpoint's own tower tensors (if any) are dropped, unless its
    config has a ``vision_config``. With ``clip``, the config gets the CLIP's vision config
    (checked against the checkpoint: width, select layer, anyres grid), and the tower's
    weights are the checkpoint's own when it holds them all (a LLaVA trained with
    ``unfreeze_mm_vision_tower``), else the CLIP directory's.
    Returns (config, source tensors, where the tower's weights come from).
    """
    tower = {n for n in source if n.startswith("model.vision_tower.")}
    # the CLIP the checkpoint was trained with, as its config.json names it
    clip_dir = (f"CLIP_DIR (a download of {config.mm_vision_tower})" if config.mm_vision_tower
                else "CLIP_DIR (the CLIP it was trained with)")
    if clip is None:
        if config.vision_config is None and config.mm_projector_type is not None:
            if tower:
                print(f"pmod: warning: {src} holds {len(tower)} vision-tower tensors but no vision config: "
                      f"they are dropped; to keep the tower, convert with --vision-tower {clip_dir}, for "
                      "its config.json", file=sys.stderr)
            else:
                print(f"pmod: warning: {src} has no vision tower: the converted model takes no images; "
                      f"convert with --vision-tower {clip_dir} to include it",
                      file=sys.stderr)
        return config, source, src
    if config.mm_projector_type is None:
        raise PmodError(f"{src} is a text-only model (its config.json has no mm_projector_type): "
                        f"--vision-tower {clip.path} has no use; drop it")
    v = clip.vision_config
    cfg = f"{src / 'config.json'}"
    if v.hidden_size != config.mm_hidden_size:
        raise PmodError(
            f"vision tower {clip.path} has hidden_size {v.hidden_size} but {cfg} has mm_hidden_size "
            f"{config.mm_hidden_size} (the projector's input width): pass the CLIP tower the checkpoint "
            f"was trained with" + (f" ({config.mm_vision_tower})" if config.mm_vision_tower else ""))
    config = dataclasses.replace(config, vision_config=v)
    check_tower_fits(config, f"vision tower {clip.path}", cfg)
    needed = set(vision_tensors(config))
    own = {vision_tower_name(n, config) for n in tower} - {None}
    if needed <= own:
        return config, source, src  # the checkpoint's own (fine-tuned) tower; CLIP gives its config
    if own:
        print(f"pmod: warning: {src} holds only {len(own & needed)} of the {len(needed)} vision-tower "
              f"tensors the model needs: they are ignored, the tower comes from {clip.path}", file=sys.stderr)
    out = {n: t for n, t in source.items() if n not in tower}
    for rest, t in clip.tensors().items():
        out[OFFICIAL_TOWER_PREFIX + rest] = t
    return config, out, clip.path
