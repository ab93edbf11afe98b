"""Named model shapes for ``pmod bench --preset``, each built once with seeded random weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pmod.config import FORMAT_VERSION, PmodConfig
from pmod.errors import PmodError
from pmod.flops import _PMOD_KEYS, PRESETS as FLOPS_PRESETS
from pmod.app.bench.cache import cache_root, digest
from pmod.app.bench.processes import note, proc_kib

SEED = 0  # of the preset weights and of the benchmark prompts
INIT = 2  # the preset weights' scheme (2: pmod.init with spread routers), part of their cache key


@dataclass(frozen=True)
class Preset:
    config: dict | None  # None: the embedded model
    vision: tuple[int, ...]
    text: int
    weights_dtype: str = "float32"


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
             rms_norm_eps=1e-5, **{**_PMOD_KEYS, "mod_decay_span": 5},
             mm_projector_type="linear", mm_hidden_size=64),
        vision=(32, 96), text=16),
    "embedded": Preset(None, vision=(), text=48),  # vision: one image of the shipped model
    "next-proxy": Preset(
        dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=32,
             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
             rms_norm_eps=1e-5, **_PMOD_KEYS, mm_projector_type="mlp2x_gelu", mm_hidden_size=1024),
        vision=(2880,), text=64),
    "next-7b": Preset(FLOPS_PRESETS["llava-next-7b"], vision=(2880,), text=64, weights_dtype="float16"),
}


#: the presets with seeded random weights (``embedded`` is the shipped model)
RANDOM_PRESETS = [n for n in PRESETS if PRESETS[n].config is not None]


def _check_room_for_7b(config: PmodConfig, cached: bool, run_dtype: str | None) -> None:
    """Refuse ``next-7b`` before building or loading it when this machine lacks the memory."""
    from pmod.format import expected_tensors

    params = sum(int(np.prod(s)) for s in expected_tensors(config).values())
    run = params * (2 if run_dtype in ("float16", "bfloat16") else 4)
    need = int(1.15 * max(run, 0 if cached else 4 * params))  # building holds float32 weights
    avail = proc_kib("/proc/meminfo", "MemAvailable")
    if avail is not None and avail < need:
        what = "to run it" if cached else "to build (float32) and run it"
        raise PmodError(f"--preset next-7b needs about {need / 2**30:.0f} GiB of free memory {what}; "
                        f"{avail / 2**30:.0f} GiB is available here: try --preset next-proxy")


def _preset_config(name: str) -> tuple[PmodConfig, str]:
    """A random preset's config and the key of its builds."""
    if name not in PRESETS:
        raise PmodError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    config = PmodConfig(**PRESETS[name].config)
    return config, digest(dict(config=config.to_dict(), seed=SEED, dtype=PRESETS[name].weights_dtype,
                               format=FORMAT_VERSION, init=INIT))


def preset_checkpoint(name: str, run_dtype: str | None = None) -> Path:
    """The checkpoint of preset ``name``, built once with seeded random weights and cached."""
    if name == "embedded":
        from pmod.app.models import resolve_model

        return resolve_model(None)
    from pmod.format import save_checkpoint
    from pmod.init import random_weights

    config, key = _preset_config(name)
    path = cache_root() / "bench" / "presets" / f"{name}-{key}"
    cached = (path / "config.json").is_file()  # save_checkpoint renames a complete directory into place
    if name == "next-7b":
        _check_room_for_7b(config, cached, run_dtype)
    if cached:
        return path
    note(f"building the {name} checkpoint once (seeded random weights) in {path}")
    # pmod.init starts routers at 0 (every score ties); spread, routing picks a real top-k.
    tensors = random_weights(config, seed=SEED, spread_routers=True)
    try:
        return save_checkpoint(path, config, tensors, dtype=PRESETS[name].weights_dtype)
    except PmodError:
        if (path / "config.json").is_file():  # another run built it meanwhile
            return path
        raise


def preset_config_dir(name: str) -> Path:
    """A directory holding only preset ``name``'s ``config.json``: the torch backend opens it with
    ``seeded_weights=SEED`` and draws the weights on its device (no checkpoint is built)."""
    from pmod.format import atomic_dir, write_config

    config, key = _preset_config(name)
    path = cache_root() / "bench" / "presets" / f"{name}-{key}-config"
    if not (path / "config.json").is_file():
        try:
            with atomic_dir(path) as tmp:
                write_config(tmp, config, PRESETS[name].weights_dtype)
        except PmodError:
            if not (path / "config.json").is_file():  # not another run's meanwhile
                raise
    return path
