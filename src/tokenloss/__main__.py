"""``python -m tokenloss`` runs the command line."""

import sys

from tokenloss.cli import main

sys.exit(main())
