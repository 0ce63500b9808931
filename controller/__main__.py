"""``python -m controller`` is the ``gateway-canary`` command."""

import sys

from controller.cli import main

sys.exit(main())
