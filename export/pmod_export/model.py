"""The p-MoD LLaVA model in torch, loaded from a pmod checkpoint directory.

One set of weights, three exportable views of it: ``embed`` (token ids -> embeddings),
``vision`` (pixels + packing index -> image tokens) and ``decoder(form, size)`` (the static
decoder: ``text`` for decode steps, ``shape`` for prefill chunks of up to ``N`` routed
vision tokens, ``bucket`` for a vision bucket of ``B`` slots; ``pmod_export.decoder``). Weights are read with pmod's validated reader (``pmod.format.validate``)
and cast to the compute dtype.
"""

from __future__ import annotations

from pathlib import Path

from . import torch_loader  # noqa: F401  (imports torch; before it, see there)

import torch
import torch.nn as nn

from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.format import expected_tensors, read_config, validate
from pmod.init import init_rule
from pmod.quantization import require_float
from pmod.safetensors_io import read_tensors, to_float32

from .decoder import Embed, LanguageModel, StaticDecoder
from .vision import Projector, VisionEncoder, VisionTower

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str | None) -> torch.dtype:
    name = name or "float32"
    if name not in DTYPES:
        raise PmodError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


class PmodTorchModel(nn.Module):
    def __init__(self, config: PmodConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config)
        if config.vision_config is not None:
            self.vision_tower = VisionTower(config)
        if config.mm_projector_type is not None:
            self.projector = Projector(config)
            if "unpad" in (config.mm_patch_merge_type or ""):
                self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))
        self._decoders: dict[tuple, StaticDecoder] = {}

    @property
    def has_vision(self) -> bool:
        return hasattr(self, "vision_tower") and hasattr(self, "projector")

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.norm.weight.dtype

    def embed(self) -> Embed:
        return Embed(self.language_model)

    def vision(self) -> VisionEncoder:
        if not self.has_vision:
            raise PmodError("this checkpoint has no vision tower (and projector), so it cannot encode images: "
                            "re-convert it with 'pmod convert SRC DST --vision-tower CLIP_DIR'")
        return VisionEncoder(self.vision_tower, self.projector, getattr(self, "image_newline", None))

    def decoder(self, form: str, size: int | None = None, max_context: int | None = None, retention: float = 1.0,
                target: str | None = None) -> StaticDecoder:
        """The static decoder in ``form`` (``text``, ``shape``, ``bucket``; built once per setting)."""
        key = (form, size, int(max_context or self.config.max_position_embeddings), float(retention), target)
        if key not in self._decoders:  # its RoPE tables go where the weights are
            self._decoders[key] = StaticDecoder(self.language_model, *key).to(self.language_model.norm.weight.device)
        return self._decoders[key]


def load(path: str | Path, dtype: str | None = None, device: torch.device | None = None,
         seeded_weights: int | None = None) -> PmodTorchModel:
    """Validate and load a pmod checkpoint into :class:`PmodTorchModel` (eval mode, no grad).

    The model is built without storage and each tensor is read (memory-mapped), widened
    by ``pmod.safetensors_io.to_float32`` and cast on its own straight onto ``device`` (default
    the CPU), so loading holds the model once in ``dtype`` plus one float32 tensor on the host.
    ``seeded_weights=SEED``: no tensors are read (the directory needs only its config.json); see
    :func:`draw_weights`.
    """
    target = torch_dtype(dtype)
    if seeded_weights is None:
        config, found = validate(path)
        require_float(config, path, "the torch backend")
    else:
        config, found = read_config(path), None
    with torch.device("meta"):
        model = PmodTorchModel(config)
    if found is None:
        state = draw_weights(config, seeded_weights, target, device)
    else:
        by_file: dict[Path, list[str]] = {}
        for name, (f, _) in found.items():
            by_file.setdefault(f, []).append(name)
        state = {}
        for f, names in by_file.items():
            raw = read_tensors(f, names)
            for name in names:
                state[name] = torch.tensor(to_float32(raw[name], found[name][1]), dtype=target, device=device)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:  # validate() guarantees the format's names; this is a pmod bug
        raise PmodError(f"checkpoint tensors do not fit the torch model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); report this as a bug")
    model.eval().requires_grad_(False)
    return model


def draw_weights(config: PmodConfig, seed: int, dtype: torch.dtype, device: torch.device | None) -> dict:
    """Seeded random weights (``pmod.init.init_rule``, routers spread) drawn by torch, tensor by
    tensor in float32, then cast onto ``device``: a 7B model's in seconds on a GPU, with no
    checkpoint to build. They are drawn on the first CUDA GPU wherever one is visible (else the
    CPU), so every engine on a machine gets the same weights for a seed, whatever its device
    and dtype: a GPU float16 model and its CPU float32 reference are one model."""
    draw = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=draw).manual_seed(int(seed))
    state = {}
    for name, shape in expected_tensors(config).items():
        kind, std = init_rule(config, name, shape, spread_routers=True)
        if kind == "normal":
            a = torch.randn(shape, generator=gen, device=draw).mul_(std)
        else:
            a = (torch.ones if kind == "ones" else torch.zeros)(shape, device=draw)
        state[name] = a.to(device or "cpu", dtype)
    return state
