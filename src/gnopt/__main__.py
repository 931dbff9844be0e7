"""``python -m gnopt`` = the ``gnopt`` console script."""

import sys

from gnopt.cli import main

sys.exit(main())
