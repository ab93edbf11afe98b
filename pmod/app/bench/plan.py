"""The settings of one ``pmod bench`` run, checked from its flags before anything is built or run."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from pmod.config import PmodConfig
from pmod.app.registry import BACKENDS
from pmod.errors import PmodError
from pmod.app.bench.presets import PRESETS, RANDOM_PRESETS, preset_checkpoint, preset_config_dir
from pmod.app.bench.processes import note

MODES = ("dense", "pmod")
DEFAULT_VISION = (576, 1440, 2880, 5760)
DEFAULT_TEXT = 64

# Top-level modules each backend needs here (onnx and trt also export the graphs with torch).
_REQUIRES = {
    "mlx": ("mlx",),
    "torch": ("torch",),
    "onnx": ("onnxruntime", "onnx", "torch"),
    "trt": ("tensorrt", "cuda", "onnx", "torch"),
}


def _counts(text: str, flag: str) -> list[int]:
    items = [s.strip() for s in str(text).split(",")]
    if not items or not all(s.isdigit() for s in items):
        raise PmodError(f"{flag} takes whole numbers >= 0 separated by commas (e.g. 576,2880), got {text!r}")
    return sorted({int(s) for s in items})


def _backends(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise PmodError(f"--backend needs at least one of {', '.join(BACKENDS)}")
    for name in names:
        if name not in BACKENDS:
            raise PmodError(f"unknown backend {name!r} in --backend: choose from {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def missing(backend: str) -> str | None:
    """Why ``backend`` cannot run here (a module it needs is not installed), or None."""
    for module in _REQUIRES[backend]:
        if importlib.util.find_spec(module) is None:
            return f"not installed ({module} is missing): pip install 'pmod[{BACKENDS[backend][1]}]'"
    return None


@dataclass
class Plan:
    """The validated settings of one run."""

    checkpoint: Path
    config: PmodConfig
    backends: list[str]
    vision: list[int]
    text: int
    decode: int
    repeat: int
    dtype: str | None
    profile: bool
    model: str | None
    preset: str | None
    retention: float = 1.0  # pmod.schedule.layer_ratios' dial for the p-MoD runs
    device: str | None = None  # the torch runs' (cpu or cuda)
    seeded: bool = False  # torch draws the preset's weights on its device (checkpoint: a config only)


def _writable(path, flag: str) -> None:
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise PmodError(f"{flag} {path}: its directory does not exist")


def make_plan(args) -> Plan:
    """Check every flag before anything is built or run (each error is one line)."""
    from pmod.format import read_config

    model, preset = getattr(args, "model", None), getattr(args, "preset", None)
    if model is None and preset is None:
        raise PmodError(f"give --model DIR or --preset NAME (presets: {', '.join(PRESETS)})")
    if model is not None and preset is not None:
        raise PmodError("give either --model or --preset, not both")
    if preset is not None and preset not in PRESETS:
        raise PmodError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    backends = _backends(args.backend)
    for flag, v, low in (("--decode-tokens", args.decode_tokens, 0), ("--repeat", args.repeat, 1),
                         ("--text-tokens", args.text_tokens, 0)):
        if v is not None and v < low:
            raise PmodError(f"{flag} must be >= {low}, got {v}")
    explicit = args.vision_tokens is not None
    vision = _counts(args.vision_tokens, "--vision-tokens") if explicit else None
    _writable(args.json, "--json")
    _writable(args.plot, "--plot")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise PmodError("--plot needs matplotlib: pip install matplotlib")

    seeded = bool(getattr(args, "seeded_weights", False))  # the GPU check's, not a pmod bench flag
    if seeded and (preset not in RANDOM_PRESETS or backends != ["torch"]):
        raise PmodError("seeded weights are drawn by the torch backend for a random preset only")
    if preset is not None:
        ckpt = preset_config_dir(preset) if seeded else preset_checkpoint(preset, args.dtype)
        config = read_config(ckpt)
        p = PRESETS[preset]
        if vision is None:
            vision = list(p.vision) or [_one_image_tokens(config)]  # the embedded model: its own
        text = p.text if args.text_tokens is None else args.text_tokens
    else:
        ckpt = Path(model)
        config = read_config(ckpt)
        vision = vision or list(DEFAULT_VISION)
        text = DEFAULT_TEXT if args.text_tokens is None else args.text_tokens

    limit = config.max_position_embeddings
    over = [n for n in vision if n + text + args.decode_tokens > limit]
    if over and (explicit or len(over) == len(vision)):
        raise PmodError(f"{over[-1]} vision + {text} text + {args.decode_tokens} decode tokens exceed the "
                        f"model's context of {limit} tokens (max_position_embeddings): lower --vision-tokens")
    if over:
        note(f"leaving out {', '.join(map(str, over))} vision tokens: over the model's context of {limit}")
        vision = [n for n in vision if n not in over]
    if min(vision) + text == 0:
        raise PmodError("a prefill needs at least one token: raise --vision-tokens or --text-tokens")
    return Plan(ckpt, config, backends, vision, text, args.decode_tokens, args.repeat, args.dtype,
                bool(args.profile), model, preset, 1.0 if args.retention is None else args.retention,
                getattr(args, "device", None), seeded)


def _one_image_tokens(config: PmodConfig) -> int:
    """Routed vision tokens of one image of the model."""
    from pmod.static.contract import one_image_vision_tokens

    return one_image_vision_tokens(config)
