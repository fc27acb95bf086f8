"""`python -m rlhf.cli` = the `rlhf` command."""

import sys

from rlhf.cli import main

sys.exit(main())
