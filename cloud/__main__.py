"""``python -m tern.cloud``: the same as ``tern-bridge``."""

import sys

from tern.cloud.cli import main

sys.exit(main())
