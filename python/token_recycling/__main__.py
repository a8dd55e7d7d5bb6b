"""``python -m token_recycling`` is the ``token-recycling`` command."""

import sys

from .tools.cli import main

sys.exit(main())
