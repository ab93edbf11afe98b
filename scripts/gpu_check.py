#!/usr/bin/env python
"""Everything a lent NVIDIA GPU should run, as one command (``pmod.app.gpu_check``):

    python scripts/gpu_check.py --out gpu-check/                                # on the GPU: next-7b, float16
    python scripts/gpu_check.py --device cpu --preset tiny --vision-tokens 32,96 --out /tmp/rehearsal
"""

from pmod.app.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
