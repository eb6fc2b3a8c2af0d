"""Pack an image folder into one file and unpack it again, byte for byte.

    python benchmarks/pack_folder.py pack ../shared/data/cifar10 .gpu/cifar10.pack
    python benchmarks/pack_folder.py unpack .gpu/cifar10.pack /tmp/cifar10

Why: the lent GPU machine receives only the repository (64 MiB in all) and cannot reach
../shared. The CIFAR-10 folder is 55 MB of JPEG bytes in 60,000 files; a tar or zip
of it adds 512 or ~120 bytes of headers per file (a tar is 93 MB), so this stores one
JSON index (relative path, size) followed by the concatenated file bytes.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path


def pack(src: str, out: str) -> None:
    root = Path(src)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    index = [[str(p.relative_to(root)), p.stat().st_size] for p in files]
    head = json.dumps(index).encode()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for p in files:
            f.write(p.read_bytes())
    print(f"packed {len(files)} files ({sum(s for _, s in index) / 2**20:.1f} MiB) into {out}")


def unpack(pack_file: str, dst: str) -> None:
    root = Path(dst)
    with open(pack_file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        index = json.loads(f.read(n))
        made = set()
        for rel, size in index:
            p = root / rel
            if p.parent not in made:
                os.makedirs(p.parent, exist_ok=True)
                made.add(p.parent)
            data = f.read(size)
            if len(data) != size:
                raise SystemExit(f"{pack_file} is truncated at {rel}")
            p.write_bytes(data)
    print(f"unpacked {len(index)} files into {dst}")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        raise SystemExit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(sys.argv[2], sys.argv[3])
