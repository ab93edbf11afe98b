"""``python -m pmod.app.bench --worker SPEC``: one benchmark worker, started by ``pmod bench``."""

import sys

from pmod.app.bench.worker import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
