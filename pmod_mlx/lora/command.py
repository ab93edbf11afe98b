"""``pmod lora`` (reached through ``pmod.app.registry.TOOLS["lora"]``)."""

from __future__ import annotations

from dataclasses import fields

from pmod.lora_data import TrainArgs, resolve_args

from .trainer import Trainer


def run_lora(args) -> dict:
    """``pmod lora``: ``args`` holds the flags (``None`` where not given; the CLI has filled in
    the embedded model when a new run names none)."""
    given = {f.name: getattr(args, f.name, None) for f in fields(TrainArgs)}
    targs = resolve_args(given, resume=bool(args.resume))
    trainer = Trainer(targs, resume=bool(args.resume), progress=not getattr(args, "no_progress", False))
    return trainer.train()
