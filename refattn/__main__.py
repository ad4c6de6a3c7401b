"""``python -m refattn``: the same as the ``refattn`` command."""

import sys

from refattn.cli import main

sys.exit(main())
