"""``python -m tests.bench [SECTION ...]``: run bench sections (see tests/bench/main.py)."""

import sys

from tests.bench.main import main

sys.exit(main())
