"""`python -m ssl_sphere.knn`: the command of ssl_sphere.cli.knn (also installed as ssl-sphere-knn)."""

import sys

from .cli.knn import main

if __name__ == "__main__":
    sys.exit(main())
