"""``python -m tern.edge``: the same as ``tern-gateway``."""

import sys

from tern.edge.cli import main

sys.exit(main())
