"""``python -m jobs.quant ...`` = ``telechat quantize ...``."""

import sys

from jobs.quant.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
