"""``python -m tern.device``: the same as ``tern-device``."""

import sys

from tern.device.cli import main

sys.exit(main())
