"""``python -m medalign_platform`` runs the ``medalign`` CLI."""

import sys

from .cli import main

sys.exit(main())
