"""``python -m celo2`` is the ``celo2`` command."""

import sys

from celo2.cli.main import main

sys.exit(main())
