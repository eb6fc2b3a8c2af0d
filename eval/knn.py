"""Offline weighted-kNN evaluation: a thin wrapper of ``python -m ssl_sphere.knn`` (same flags).

    python eval/knn.py --checkpoint runs/<run>/last.pt [--json] [--dataset ... --data-root ...]
"""

import sys

from ssl_sphere.cli.knn import main

if __name__ == "__main__":
    sys.exit(main())
