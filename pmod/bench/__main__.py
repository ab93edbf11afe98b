"""``python -m pmod.bench --worker SPEC``: one benchmark worker, started by ``pmod bench``."""

import sys

from .worker import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
