#!/usr/bin/env python
"""Load generator for ``pmod server`` (``pmod.app.bench.serving``): a 5-turn chat's time to first
token with the caches on and off, and concurrent clients on a batching and a one-at-a-time server.

    python scripts/serve_bench.py                      # the embedded model, 8 clients
    python scripts/serve_bench.py --preset next-proxy  # random weights, text only
"""

from pmod.app.bench.serving import main

if __name__ == "__main__":
    raise SystemExit(main())
