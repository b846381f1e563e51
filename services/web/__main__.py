"""`python -m services.web`: see launch.py."""

import sys

from services.web.launch import main

sys.exit(main())
