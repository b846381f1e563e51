"""``python -m services.api`` = ``telechat serve``."""

import sys

from services.commands import SERVE
from telechat.cli import run

sys.exit(run(SERVE, "serve", sys.argv[1:]))
