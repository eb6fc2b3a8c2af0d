"""`python -m ssl_sphere.pretrain`: the command of ssl_sphere.cli.pretrain (also installed as ssl-sphere-pretrain)."""

import sys

from .cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
