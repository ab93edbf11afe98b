"""The last check of every source layout: its renamed tensors are exactly what the config calls for."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from pmod.config import PmodConfig
from pmod.convert.sources import FLOAT_SOURCE_DTYPES, SourceTensor
from pmod.errors import PmodError
from pmod.format import expected_tensors


def checked_tensors(mapped: dict[str, SourceTensor], config: PmodConfig, src, source_name: Callable[[str], str],
                    tower_src=None) -> dict[str, SourceTensor]:
    """``mapped`` (pmod name -> source tensor) in file order, once it is exactly what the
    config calls for (names, shapes, float dtypes).

    ``source_name`` gives a missing tensor's name in the source's layout; ``tower_src``:
    where the vision tower's tensors come from, when not ``src`` (``--vision-tower``).
    """
    expected = expected_tensors(config)
    for new, t in mapped.items():
        if new not in expected:
            hint = ("vision_config, mm_vision_select_layer?" if new.startswith("vision_tower.")
                    else "attention_bias (qkv_bias, o_bias), mlp_bias, mod_bias_enabled, mm_patch_merge_type?")
            raise PmodError(
                f"unexpected tensor '{t.name}' in {t.file.name}: config.json does not call for it ({hint})")
    missing = [n for n in expected if n not in mapped]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        if missing[0].startswith("vision_tower.") and tower_src is not None and Path(tower_src) != Path(src):
            raise PmodError(
                f"vision tower tensor '{missing[0][len('vision_tower.'):]}'{more} is missing from {tower_src}; "
                "pass a complete CLIP vision tower (config.json and all its weight files)")
        raise PmodError(f"tensor '{source_name(missing[0])}'{more} is missing from {src}; "
                        "download the complete checkpoint")
    for new, t in mapped.items():
        if t.shape != expected[new]:
            if new.startswith("vision_tower."):
                v = config.vision_config
                raise PmodError(
                    f"tensor '{t.name}' in {t.file} has shape {t.shape}, expected {expected[new]} from the "
                    f"vision config (hidden_size {v.hidden_size}, intermediate_size {v.intermediate_size}, "
                    f"image_size {v.image_size}, patch_size {v.patch_size}); the vision tower's weights and "
                    "config do not match")
            raise PmodError(f"tensor '{t.name}' in {t.file.name} has shape {t.shape}, expected "
                            f"{expected[new]} from config.json; is this the right config.json?")
        if t.dtype not in FLOAT_SOURCE_DTYPES:
            raise PmodError(f"tensor '{t.name}' in {t.file.name} has dtype {t.dtype}; expected a float dtype")
    return {n: mapped[n] for n in expected}
