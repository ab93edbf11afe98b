import sys

from pmod.app.cli import main

sys.exit(main())
