"""The model shipped inside the package, used when a command gets no ``--model``."""

from __future__ import annotations

from pathlib import Path

from pmod.errors import PmodError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "shapes-pmod"  # pmod/models/, package data


def resolve_model(path=None) -> Path:
    """``path`` if given, else the embedded default model."""
    if path is not None:
        return Path(path)
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise PmodError(
            f"the embedded default model is missing ({DEFAULT_MODEL}); reinstall pmod or re-create it "
            "with 'python scripts/train_default_model.py --out pmod/models/shapes-pmod'")
    return DEFAULT_MODEL
