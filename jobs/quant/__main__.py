"""``python -m jobs.quant ...`` = ``telechat quantize ...``."""

import logging
import sys

from jobs.quant.cli import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    sys.exit(main(sys.argv[1:]))
