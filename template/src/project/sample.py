"""``python -m PACKAGE.sample [RUN_DIR | CHECKPOINT | EXPORT] [options]``: the example's own (``example/sample.py``)."""

import sys

from .example.sample import main

if __name__ == "__main__":
    sys.exit(main())
