"""``python -m sams_core``: the command line (see :mod:`sams_core.cli`)."""

import sys

from sams_core.cli import main

sys.exit(main())
