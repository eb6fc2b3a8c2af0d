import os
import tempfile
from pathlib import Path

import pytest
import torch

import ssl_sphere.methods  # noqa: F401  the built-in methods, which config resolves by name (each test file alone)

REPO = Path(__file__).resolve().parents[1]

# the decoded-image cache of the tests' image folders: one fresh directory per test session (subprocesses
# inherit it), never the user's ~/.cache
os.environ.setdefault("SSL_SPHERE_CACHE", tempfile.mkdtemp(prefix="ssl_sphere_test_cache_"))
CIFAR_FOLDER = Path(os.environ.get("SSL_SPHERE_CIFAR10", REPO.parent / "shared" / "data" / "cifar10"))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


requires_cifar_folder = pytest.mark.skipif(
    not (CIFAR_FOLDER / "train").is_dir(),
    reason=f"real CIFAR-10 image folder not found at {CIFAR_FOLDER} (set SSL_SPHERE_CIFAR10 to point elsewhere)",
)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA device (run `pytest -m cuda` on a GPU machine)")

#: a device parameter whose "cuda" case carries the cuda marker and skips with a reason without CUDA
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


def make_image_folder(root: Path, n_train: int = 12, n_test: int = 4, classes=("a", "b"), hw=(20, 24),
                      seed: int = 0) -> Path:
    """ROOT/{train,test}/<class>/<i>.png of random RGB pixels; returns ROOT."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = torch.randint(0, 256, (*hw, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(d / f"{i}.png")
    return root
