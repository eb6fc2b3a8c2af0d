"""`python -m ssl_sphere.linear`: the command of ssl_sphere.cli.linear (also installed as ssl-sphere-linear)."""

import sys

from .cli.linear import main

if __name__ == "__main__":
    sys.exit(main())
