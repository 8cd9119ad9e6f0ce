"""Images as arrays in a local ``.npz``: loaded directly, no per-run decoding, no download.

Expected keys (``np.savez`` names):

* ``train_images``: uint8, ``N x H x W x C`` or ``N x C x H x W`` (C = 1 or 3), or ``N x H x W`` (gray);
* ``train_labels``: integer class ids, shape ``N``;
* ``test_images`` / ``test_labels`` (optional, same layout): the evaluation split. Without them,
  ``data.eval_fraction`` of the training images is held out (seeded by ``data.seed``).

``python -m ds_soo.data.npz --from-cifar10 SRC.npz OUT.npz`` decodes the shared JPEG CIFAR-10 file once
into such an arrays file (keep it outside the repository, e.g. next to your runs or in a cache directory),
so later runs read 180 MB of arrays instead of decoding 60 000 JPEGs.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np

from ds_soo.config import ConfigError

KEYS = ("train_images", "train_labels")
TEST_KEYS = ("test_images", "test_labels")


def _nhwc(x: np.ndarray, file: Path, key: str) -> np.ndarray:
    """Any accepted layout -> N x H x W x C uint8; a wrong dtype or shape names the key."""
    if x.dtype != np.uint8:
        raise ConfigError(f"data.file: {file}: {key} must be uint8 images, got dtype {x.dtype}")
    if x.ndim == 3:
        return x[..., None]
    if x.ndim != 4:
        raise ConfigError(f"data.file: {file}: {key} must be N x H x W x C or N x C x H x W, got shape {x.shape}")
    if x.shape[-1] in (1, 3):
        return x
    if x.shape[1] in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    raise ConfigError(f"data.file: {file}: {key} has no channel axis of size 1 or 3 (shape {x.shape})")


def _labels(y: np.ndarray, n: int, file: Path, key: str) -> np.ndarray:
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"data.file: {file}: {key} must be {n} integer labels, got {y.dtype} of shape {y.shape}")
    if n and y.min() < 0:
        raise ConfigError(f"data.file: {file}: {key} holds negative class ids")
    return y.astype(np.int64)


def read_arrays(file: Path) -> dict[str, np.ndarray]:
    """All arrays of ``file``; a file that is not a (complete) zip, or holds pickles, is a ConfigError."""
    try:
        with np.load(file, allow_pickle=False) as d:
            return {k: d[k] for k in d.files}
    except FileNotFoundError:
        raise ConfigError(f"data.file: {file} does not exist") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ConfigError(f"data.file: {file} is not a readable .npz (truncated or not a zip archive?): {e}") from None


def load_npz(file: Path, eval_fraction: float, seed: int):
    """((train_x, train_y), (test_x, test_y)) as N x H x W x C uint8 and int64 labels."""
    arrays = read_arrays(file)
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise ConfigError(
            f"data.file: {file} lacks {missing}; an image .npz needs {list(KEYS)} and optionally "
            f"{list(TEST_KEYS)}, it has {sorted(arrays)}"
        )
    x = _nhwc(arrays["train_images"], file, "train_images")
    y = _labels(arrays["train_labels"], len(x), file, "train_labels")
    if all(k in arrays for k in TEST_KEYS):
        tx = _nhwc(arrays["test_images"], file, "test_images")
        ty = _labels(arrays["test_labels"], len(tx), file, "test_labels")
        if tx.shape[1:] != x.shape[1:]:
            raise ConfigError(f"data.file: {file}: test_images are {tx.shape[1:]}, train_images {x.shape[1:]}")
        return (x, y), (tx, ty)
    if any(k in arrays for k in TEST_KEYS):
        raise ConfigError(f"data.file: {file} has only one of {list(TEST_KEYS)}; give both or neither")
    order = np.random.default_rng(seed).permutation(len(x))
    n_eval = max(1, int(round(eval_fraction * len(x))))
    if n_eval >= len(x):
        raise ConfigError(f"data.file: {file} has {len(x)} images, too few to hold out data.eval_fraction")
    ev, tr = order[:n_eval], order[n_eval:]
    return (x[tr], y[tr]), (x[ev], y[ev])


def cifar10_to_npz(src: Path, dst: Path) -> Path:
    """Decode the JPEG CIFAR-10 file once into an arrays ``.npz`` (written atomically)."""
    from ds_soo.data.cifar10 import load_split

    arrays = {}
    for split in ("train", "test"):
        images, labels = load_split(src, split, None, 0)
        order = np.argsort(np.random.default_rng(0).permutation(len(labels)))  # back to the file's order
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = np.asarray(images)[order], labels[order]
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ds_soo.data.npz", description=__doc__.split("\n")[0])
    p.add_argument("--from-cifar10", type=Path, required=True, metavar="SRC", help="cifar10_jpeg_q75.npz")
    p.add_argument("out", type=Path, help="arrays .npz to write (use it with data.source=npz data.file=OUT)")
    args = p.parse_args(argv)
    try:
        out = cifar10_to_npz(args.from_cifar10, args.out)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print(f"wrote {out}: use data.source=npz data.file={out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
