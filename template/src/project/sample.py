"""Look at what a trained model does: the example's own command (``example/sample.py``, see its ``--help``).

    python -m PACKAGE.sample [RUN_DIR | CHECKPOINT | EXPORT] [options]
"""

import sys

from .example.sample import main

if __name__ == "__main__":
    sys.exit(main())
