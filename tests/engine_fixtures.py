"""A tiny generated ImageFolder, Fashion-MNIST-format IDX files and a tiny run config for engine tests."""
import gzip
import struct
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

CLASSES = ('red', 'green', 'blue')


def make_image_folder(root: Path, train_per_class: int = 16, val_per_class: int = 4, size: int = 32) -> Path:
    """Three classes of noisy images, each dominated by one colour channel (easy to learn)."""
    rng = np.random.default_rng(0)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
                img[..., c] = rng.integers(150, 255, size=(size, size), dtype=np.uint8)
                Image.fromarray(img).save(folder / f'{i}.png')
    return root


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, gz: bool = False) -> Path:
    """An IDX file (magic ``0 0 code ndim``, big-endian dims, data), gzipped with ``gz``."""
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
    data = header + array.astype('>u1' if code == 0x08 else '>i4').tobytes()
    if gz:
        path = path.with_name(path.name + '.gz')
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_fashion_mnist(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> Path:
    """The four Fashion-MNIST IDX files with random 28x28 images and labels ``i % 10``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('t10k', n_test)):
        write_idx(folder / f'{split}-images-idx3-ubyte', rng.integers(0, 256, (n, 28, 28)), gz=gz)
        write_idx(folder / f'{split}-labels-idx1-ubyte', np.arange(n) % 10, gz=gz)
    return folder


def tiny_config(tmp: Path, data_root: Path, **sections) -> Path:
    """A 2-epoch ScaleKD run of a tiny ViT teacher into a tiny ResNet, on the generated folder."""
    cfg = dict(
        output=str(tmp / 'run'), seed=0,
        teacher=dict(model='vit_tiny_patch16_224', kwargs=dict(patch_size=8, embed_dim=64, depth=4, num_heads=2)),
        student=dict(model='resnet18', kwargs=dict(layers=[1, 1, 1, 1])),
        distill=dict(method='scalekd'),
        data=dict(root=str(data_root), img_size=32, num_classes=3, workers=0, scale=[0.5, 1.0], crop_pct=1.0),
        optim=dict(opt='sgd', lr=0.05, weight_decay=1e-4, momentum=0.9, clip_grad=5.0),
        sched=dict(sched='cosine', epochs=2, warmup_epochs=0),
        train=dict(batch_size=8, precision='fp32'),
        log=dict(progress=False, interval=1),
    )
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    path = tmp / 'config.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return path
