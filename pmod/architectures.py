"""Text model families: the seam a second language model (Qwen2, say) plugs into.

The config names its family (``PmodConfig.text_model_type``; LLaMA is the one pmod ships).
A family here says what its config must hold; each runtime maps the same name to its
decoder parts (``pmod_mlx.language.FAMILIES``, ``pmod_export.decoder.FAMILIES``) and the converter to
its tensor names (``pmod.convert.text_names.TEXT_NAMES``). Everything p-MoD adds (routers,
the schedule, per-layer caches) is family-neutral and written once per runtime.

A new family is therefore one :class:`TextFamily` entry in ``FAMILIES``, one decoder file per
runtime and its converter mapping. What LLaMA-like families differ in only by flags (the
q/k/v and o biases, tied embeddings, rope settings) needs no new code at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pmod.errors import PmodError

if TYPE_CHECKING:
    from pmod.config import PmodConfig


@dataclass(frozen=True)
class TextFamily:
    """``name`` (the config's ``text_model_type``); ``hidden_acts``: the MLP activations its
    decoders implement (the first is the default)."""

    name: str
    hidden_acts: tuple[str, ...]

    def check(self, config: "PmodConfig") -> None:
        if config.hidden_act not in self.hidden_acts:
            raise PmodError(f"config key 'hidden_act' must be {' or '.join(map(repr, self.hidden_acts))} "
                            f"({self.name}), got {config.hidden_act!r}")


FAMILIES: dict[str, TextFamily] = {"llama": TextFamily("llama", ("silu",))}

#: Top-level ``model_type`` values whose text family is in the name (official LLaVA and p-MoD).
MODEL_TYPE_FAMILIES = {"llama": "llama", "llava_llama": "llama", "pmod_llava_llama": "llama"}


def family(name: str) -> TextFamily:
    """The registered family ``name``, or a one-line error listing the known ones."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise PmodError(f"config key 'text_model_type' is {name!r}, a text model pmod does not run: "
                        f"known {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def family_of(d: dict) -> str | None:
    """The text family a raw ``config.json`` names: ``text_model_type`` (pmod), llava-hf's
    ``text_config.model_type``, or a family-bearing ``model_type``; None: not said (LLaMA)."""
    if isinstance(d.get("text_model_type"), str):
        return d["text_model_type"]
    text = d.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("model_type"), str):
        return text["model_type"]
    model_type = d.get("model_type")
    if isinstance(model_type, str):
        if model_type in MODEL_TYPE_FAMILIES:
            return MODEL_TYPE_FAMILIES[model_type]
        for prefix in ("pmod_llava_", "llava_"):
            if model_type.startswith(prefix) and model_type != "llava_next":
                return model_type[len(prefix):]  # e.g. llava_qwen -> qwen: refused unless registered
    return None


def runtime_entry(table: dict, config: "PmodConfig", runtime: str):
    """A runtime's ``FAMILIES`` entry for the config's family, or a one-line error naming what it runs."""
    if config.text_model_type not in table:
        raise PmodError(f"the {runtime} runtime has no decoder for text model {config.text_model_type!r}: "
                        f"it runs {', '.join(sorted(table))}")
    return table[config.text_model_type]
