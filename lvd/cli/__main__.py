"""`python -m lvd.cli ...` is the `lvd` command (what launchers and tests start)."""

import sys

from lvd.cli.main import main

sys.exit(main())
