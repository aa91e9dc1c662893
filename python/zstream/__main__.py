"""``python -m zstream``: the ``zstream`` command."""

import sys

from .interfaces.cli import main

sys.exit(main())
