"""Train the embedded default model: a small p-MoD LLaVA, from scratch, in MLX.

The code is ``pmod.tasks.shapes.train`` (the recipe and its two stages are described
there); this is its entry point.

    python scripts/train_default_model.py --out pmod/models/shapes-pmod
"""

from pmod.tasks.shapes.train import main

if __name__ == "__main__":  # guarded: the data-parallel ranks are spawned and re-import this file
    raise SystemExit(main())
