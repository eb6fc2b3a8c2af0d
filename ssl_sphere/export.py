"""`python -m ssl_sphere.export`: the command of ssl_sphere.cli.export (also installed as ssl-sphere-export)."""

import sys

from .cli.export import main

if __name__ == "__main__":
    sys.exit(main())
