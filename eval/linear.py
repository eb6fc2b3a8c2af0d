"""Offline linear probe: a thin wrapper of ``python -m ssl_sphere.linear`` (same flags).

    python eval/linear.py --checkpoint runs/<run>/last.pt [--json] [--dataset ... --data-root ...]
"""

import sys

from ssl_sphere.cli.linear import main

if __name__ == "__main__":
    sys.exit(main())
