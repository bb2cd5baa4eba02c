"""``python -m costeer_processor`` is the ``costeer`` command."""

import sys

from .cli import main

sys.exit(main())
