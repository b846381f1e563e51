"""``python -m jobs.finetune``: the same as ``telechat finetune``."""

import sys

from jobs.finetune.cli import main

sys.exit(main())
