"""``python -m litemultistep``: the same as the ``litemultistep`` command."""

import sys

from .cli import main

sys.exit(main())
