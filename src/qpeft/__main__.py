"""``python -m qpeft``: the same as the ``qpeft`` console script."""

import sys

from .cli import main

sys.exit(main())
