"""``python -m services.api`` = ``telechat serve``."""

import sys

from telechat.cli import main

sys.exit(main(["serve", *sys.argv[1:]]))
