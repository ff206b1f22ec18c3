"""``python -m mixmim ...`` (also what ``torchrun -m mixmim`` runs on every process)."""

import sys

from .cli import main

sys.exit(main())
