"""``python -m thinkrl ...``: the same command line as ``thinkrl ...``."""

import sys

from thinkrl.cli import main

if __name__ == "__main__":
    sys.exit(main())
