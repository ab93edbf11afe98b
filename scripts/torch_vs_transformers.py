#!/usr/bin/env python
"""The torch backend (dense twin and p-MoD) against transformers' LlamaForCausalLM (sdpa) on the
same weights, in one process; prints a Markdown table (``pmod.app.bench.peers``).

    python scripts/torch_vs_transformers.py --preset next-proxy --vision-tokens 576,1440,2880
"""

from pmod.app.bench.peers import main

if __name__ == "__main__":
    raise SystemExit(main())
