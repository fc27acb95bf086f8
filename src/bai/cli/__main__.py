"""`python -m bai.cli` = the `bai` command."""

import sys

from bai.cli import main

sys.exit(main())
