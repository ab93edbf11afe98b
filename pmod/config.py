"""One dataclass for the whole model, read from and written to ``config.json``.

Keys follow Hugging Face LLaMA/LLaVA names, and the official p-MoD ``mod_*`` keys are
kept as they are, so an official ``config.json`` reads directly. Keys a runtime never
uses (training flags and the like) are ignored; a value a runtime would use but cannot
honour is an error that names the key.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pmod.architectures import family, family_of
from pmod.errors import PmodError
from pmod.jsonfile import read_json_object

if TYPE_CHECKING:
    from pmod.quantization import Quantization

FORMAT_VERSION = 1
MODEL_TYPE = "pmod_llava_llama"

_DECAY_RE = re.compile(r"^(shiftedcos|shiftedlinear)_decay_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)$")
CONSTANT_SCHEDULES = ("deep_all", "deep_all_include_last", "interleave")
_WEIGHT_NORM_RE = re.compile(r"^(tanh|sigmoid|none)(?:_(\d+(?:\.\d+)?)_(-?\d+(?:\.\d+)?))?$")
TOKEN_TYPES = ("vision_hr", "vision", "vision_all", "all")


#: The sizes a pmod checkpoint's ``vision_config`` must state (the rest take CLIP's defaults).
VISION_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size")


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision tower: ``transformers.CLIPVisionConfig``'s keys, with its defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    #: keys a runtime never uses, kept so that a checkpoint's config.json round-trips
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, v, where: str | None = None) -> "VisionConfig":
        """A pmod checkpoint's ``vision_config`` (``where`` None), or, with ``where`` naming the
        source in messages, a CLIP's own vision config: missing keys take CLIP's defaults, only
        ``clip_vision_model`` is accepted, the geometry is checked, unknown keys are dropped."""
        if not isinstance(v, dict):
            what = where or "config key 'vision_config'"
            raise PmodError(f"{what} must be a JSON object, got {type(v).__name__}")
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        if where is None:
            for key in VISION_SIZES:
                if not _positive_int(v.get(key)):
                    raise PmodError(f"config key 'vision_config' lacks or mangles {key!r} (a positive integer, got "
                                    f"{v.get(key)!r}); re-convert with --vision-tower")
            extra = {k: x for k, x in v.items() if k not in names}
            return cls(**{k: v[k] for k in names if v.get(k) is not None}, extra=extra)
        kind = v.get("model_type", "clip_vision_model")
        if kind != "clip_vision_model":
            raise PmodError(f"{where} has model_type {kind!r}: pmod's vision tower is CLIP ('clip_vision_model')")
        c = cls(**{k: v[k] for k in names if v.get(k) is not None}, extra={"model_type": "clip_vision_model"})
        for key in VISION_SIZES + ("num_channels",):
            if not _positive_int(getattr(c, key)):
                raise PmodError(f"{where}: '{key}' must be a positive integer, got {getattr(c, key)!r}")
        if c.image_size % c.patch_size:
            raise PmodError(f"{where}: image_size {c.image_size} is not a multiple of patch_size "
                            f"{c.patch_size}; LLaVA's CLIP towers use e.g. 336 / 14")
        if c.hidden_size % c.num_attention_heads:
            raise PmodError(f"{where}: num_attention_heads {c.num_attention_heads} does not divide "
                            f"hidden_size {c.hidden_size}")
        if not _positive(c.layer_norm_eps):
            raise PmodError(f"{where}: 'layer_norm_eps' must be a positive number, got {c.layer_norm_eps!r}")
        return c

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d}


@dataclass
class PmodConfig:
    # the text decoder (LLaMA key names); its family says which decoder runs it (pmod.architectures)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # HF LLaMA's one flag; qkv_bias and o_bias default to it
    qkv_bias: bool | None = None  # q/k/v projections (Qwen2: true with o_bias false)
    o_bias: bool | None = None  # the attention output projection
    mlp_bias: bool = False
    text_model_type: str = "llama"
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    # p-MoD (official key names). mod_target_layers None = a dense LLaVA.
    mod_target_layers: str | None = None
    mod_router_factor: float = 0.5
    mod_weight_norm: str = "tanh_0.2_1"
    mod_bias_enabled: bool = True
    mod_target_token_type: str = "vision_hr"
    # Denominator D of the shifted-cosine schedule cos(pi*l/D). None means L-1; the
    # official code hard-codes 31, identical for the released 32-layer models.
    mod_decay_span: int | None = None
    # LLaVA multimodal keys (used by the vision runtime; kept verbatim here).
    mm_projector_type: str | None = None
    mm_vision_tower: str | None = None  # where the tower came from (informational)
    mm_use_im_start_end: bool = False
    mm_hidden_size: int | None = None
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_patch_merge_type: str = "flat"
    image_aspect_ratio: str = "square"
    image_grid_pinpoints: list | None = None
    max_num_patches: int | None = None
    vision_config: VisionConfig | None = None  # a dict (config.json's) is read into one
    # MLX affine quantization of some linears (pmod.quantization); None: float weights.
    quantization: dict | None = None
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict) or (
                self.vision_config is not None and not isinstance(self.vision_config, VisionConfig)):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        if self.o_bias is None:
            self.o_bias = self.attention_bias
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim",
                    "max_position_embeddings"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise PmodError(f"config key '{key}' must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise PmodError(
                f"config key 'num_key_value_heads' ({self.num_key_value_heads}) must divide "
                f"'num_attention_heads' ({self.num_attention_heads})")
        for key in ("attention_bias", "qkv_bias", "o_bias", "mlp_bias"):
            if not isinstance(getattr(self, key), bool):
                raise PmodError(f"config key '{key}' must be true or false, got {getattr(self, key)!r}")
        family(self.text_model_type).check(self)
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("linear", "default") or (
                    kind == "linear" and not _positive(self.rope_scaling.get("factor"))):
                raise PmodError(
                    f"config key 'rope_scaling' {self.rope_scaling!r} is not supported: "
                    "use null or {\"type\": \"linear\", \"factor\": F}")
        if not _positive(self.rope_theta):
            raise PmodError(f"config key 'rope_theta' must be a positive number, got {self.rope_theta!r}")
        if not _positive(self.rms_norm_eps):
            raise PmodError(f"config key 'rms_norm_eps' must be a positive number, got {self.rms_norm_eps!r}")
        if self.mod_target_layers is not None:
            if not isinstance(self.mod_target_layers, str) or not (
                    _DECAY_RE.match(self.mod_target_layers)
                    or self.mod_target_layers in CONSTANT_SCHEDULES):
                raise PmodError(
                    f"config key 'mod_target_layers' has unknown value {self.mod_target_layers!r}: "
                    "expected '<shiftedcos|shiftedlinear>_decay_<max>_<min>' or one of "
                    + ", ".join(CONSTANT_SCHEDULES))
            m = _DECAY_RE.match(self.mod_target_layers)
            if m and not float(m.group(3)) <= float(m.group(2)):
                raise PmodError(
                    f"config key 'mod_target_layers' {self.mod_target_layers!r}: min ratio exceeds max ratio")
            if not isinstance(self.mod_router_factor, (int, float)) or isinstance(self.mod_router_factor, bool) \
                    or not 0.0 < self.mod_router_factor <= 1.0:
                raise PmodError(
                    f"config key 'mod_router_factor' must be a number in (0, 1], got {self.mod_router_factor!r}")
            self.weight_norm  # parses, raising on a bad 'mod_weight_norm'
            if self.mod_target_token_type not in TOKEN_TYPES:
                raise PmodError(
                    f"config key 'mod_target_token_type' has unknown value {self.mod_target_token_type!r}: "
                    f"expected one of {', '.join(TOKEN_TYPES)}")
            if self.mod_target_token_type == "all":
                raise PmodError(
                    "config key 'mod_target_token_type' = 'all' (text tokens routed too) is not "
                    "supported: pmod routes vision tokens only")
        if self.mm_use_im_start_end:
            raise PmodError(
                "config key 'mm_use_im_start_end' = true (image start/end tokens) is not supported; "
                "the released LLaVA-1.5/NeXT and p-MoD checkpoints use false")
        if self.mod_decay_span is not None and (
                not isinstance(self.mod_decay_span, int) or self.mod_decay_span <= 0):
            raise PmodError(f"config key 'mod_decay_span' must be a positive integer or null, got {self.mod_decay_span!r}")
        self.quant  # parses, raising on a bad 'quantization' entry

    # -------------------------------------------------------------- derived
    @property
    def is_mod(self) -> bool:
        return self.mod_target_layers is not None

    @property
    def weight_norm(self) -> tuple[str, float, float]:
        """(kind, scale, bias) of the router weight ``w = scale * f(s) + bias``."""
        m = _WEIGHT_NORM_RE.match(self.mod_weight_norm or "")
        if not m:
            raise PmodError(
                f"config key 'mod_weight_norm' has unknown value {self.mod_weight_norm!r}: "
                "expected e.g. 'tanh_0.2_1' (tanh, sigmoid or none, then scale and bias)")
        kind, scale, bias = m.group(1), m.group(2), m.group(3)
        # The official parser falls back to scale 1, bias 1 without the numbers.
        return kind, float(scale) if scale else 1.0, float(bias) if bias else 1.0

    @property
    def quant(self) -> "Quantization | None":
        """The parsed ``quantization`` entry (None: a float checkpoint)."""
        from pmod.quantization import Quantization

        return Quantization.from_entry(self.quantization)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PmodConfig":
        d = dict(d)
        text_family = family_of(d)
        if "text_config" in d and isinstance(d["text_config"], dict):
            # llava-hf layout: the decoder's keys live in text_config.
            d = {**d, **d.pop("text_config")}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise PmodError(f"config.json lacks required key(s) {', '.join(missing)}")
        kwargs = {k: d[k] for k in names if k in d}
        if text_family is not None:
            kwargs["text_model_type"] = text_family
        if kwargs.get("rope_scaling") is not None and not isinstance(kwargs["rope_scaling"], dict):
            raise PmodError(f"config key 'rope_scaling' must be an object or null, got {kwargs['rope_scaling']!r}")
        if "rope_parameters" in d and isinstance(d["rope_parameters"], dict):
            # transformers >= 5 writes rope_theta/rope_scaling as 'rope_parameters'.
            rp = d["rope_parameters"]
            kwargs.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default":
                kwargs.setdefault("rope_scaling", rp)
        extra = {k: v for k, v in d.items() if k not in names and k not in ("extra",)}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> "PmodConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(read_json_object(path, missing="not found: is this a model directory?"))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if d["rope_scaling"] is None:
            del d["rope_scaling"]  # transformers 5 warns about a null rope_scaling
        if d["quantization"] is None:
            del d["quantization"]
        if d["vision_config"] is not None:
            d["vision_config"] = d["vision_config"].to_dict()  # float checkpoints' config.json stays as before
        d["model_type"] = MODEL_TYPE
        d["pmod_format_version"] = FORMAT_VERSION
        return d


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0
