"""``python -m fastcompute.cli``."""

import sys

from fastcompute.cli.main import main

sys.exit(main())
