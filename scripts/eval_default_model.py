"""Accuracy of a model on the shapes task's held-out test questions, p-MoD vs dense.

The code is ``pmod.tasks.shapes.evaluate`` (its ``evaluate`` is what the other scripts
reuse); this is its entry point.

    python scripts/eval_default_model.py [--model DIR] [--n 500] [--json OUT]
"""

from pmod.tasks.shapes.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
