"""Reference outputs of the shipped Fashion-MNIST teacher, for ``tests/test_demo.py``.

    .venv/bin/python tests/teacher_reference.py     # rewrites tests/fixtures/demo_teacher_logits.json

Two fixed batches: the first 16 Fashion-MNIST test images (read straight from the IDX files, when
Debian's dataset-fashion-mnist is installed) and 8 images from NumPy's seeded PCG64 generator (always
available). Both are normalised as the demo normalises them: x / 255, then (x - 0.2860) / 0.3530.
"""
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).parent / 'fixtures' / 'demo_teacher_logits.json'
FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist')
MEAN, STD = 0.2860, 0.3530
N_TEST, N_SYNTHETIC = 16, 8


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, 'rb') as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def fashion_mnist_batch():
    """(images N x 1 x 28 x 28 uint8, labels) of the first test images, or None without the dataset."""
    images, labels = FASHION_MNIST / 't10k-images-idx3-ubyte.gz', FASHION_MNIST / 't10k-labels-idx1-ubyte.gz'
    if not (images.is_file() and labels.is_file()):
        return None
    x = _idx(images, 16).reshape(-1, 1, 28, 28)[:N_TEST]
    return x, _idx(labels, 8)[:N_TEST].tolist()


def synthetic_batch() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (N_SYNTHETIC, 1, 28, 28), dtype=np.uint8)


def normalise(images: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(images.astype(np.float32)) / 255 - MEAN) / STD


def logits(teacher, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return teacher(normalise(images))


def main() -> int:
    from scalekd.tools.demo import TEACHER_WEIGHTS, load_teacher
    teacher = load_teacher(str(TEACHER_WEIGHTS))
    record = {}
    batch = fashion_mnist_batch()
    if batch is None:
        print(f'no Fashion-MNIST under {FASHION_MNIST}: install dataset-fashion-mnist first', file=sys.stderr)
        return 1
    images, labels = batch
    out = logits(teacher, images)
    record['fashion_mnist_test'] = dict(labels=labels, top1=out.argmax(1).tolist(),
                                        logits=[[round(v, 6) for v in row] for row in out.tolist()])
    out = logits(teacher, synthetic_batch())
    record['synthetic'] = dict(top1=out.argmax(1).tolist(), logits=[[round(v, 6) for v in row] for row in out.tolist()])
    FIXTURE.write_text(json.dumps(record, separators=(',', ':')) + '\n')
    print(f'wrote {FIXTURE}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
