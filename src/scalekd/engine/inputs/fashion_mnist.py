"""Fashion-MNIST (70,000 real 28x28 grey images, 10 classes) from its IDX files, found offline.

Search order: ``--data DIR`` (``data.root``), ``$SCALEKD_DATA``, Debian's package location
``/usr/share/datasets/fashion-mnist/``, then torchvision's download when network exists.
"""
import gzip
import os
import struct
from pathlib import Path
from typing import Callable, Optional, Tuple, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError

__all__ = ['FashionMNIST', 'read_idx', 'find_fashion_mnist', 'has_fashion_mnist', 'DatasetNotFound', 'FashionMNISTError',
           'CLASSES', 'DEBIAN_DIR']

CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
DEBIAN_DIR = Path('/usr/share/datasets/fashion-mnist')
FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
         'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}
SIZES = {'train': 60_000, 'test': 10_000}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


class FashionMNISTError(UserError):
    """Fashion-MNIST files that are not there, not IDX files, or not the dataset's shape."""


class DatasetNotFound(FashionMNISTError):
    """No copy of the dataset was found; the message lists every way to get one."""


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic ``0 0 dtype ndim``, big-endian dims, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == '.gz' else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise FashionMNISTError(f'{path} is not an IDX file (bad magic number)')
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FashionMNISTError(f'{path} is truncated (header of {ndim} dimensions)')
    dims = struct.unpack(f'>{ndim}I', data[4:header])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise FashionMNISTError(f'{path} holds {len(data) - header} data bytes, expected {expected} for shape {dims}')
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _idx_path(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + '.gz'):
        if (folder / name).is_file():
            return folder / name
    return None


def has_fashion_mnist(folder: Path) -> bool:
    """Whether ``folder`` holds the four Fashion-MNIST IDX files (gzipped or not)."""
    return all(_idx_path(folder, stem) for pair in FILES.values() for stem in pair)


def _not_found(tried) -> DatasetNotFound:
    lines = '\n'.join(f'  - {t}' for t in tried)
    return DatasetNotFound(
        'Fashion-MNIST was not found. Looked in:\n' + lines + '\nGet it with one of:\n'
        '  1. --data DIR            point at a folder holding the four IDX files (train-images-idx3-ubyte[.gz], ...)\n'
        '  2. SCALEKD_DATA=DIR      export SCALEKD_DATA=/path/to/fashion-mnist\n'
        '  3. Debian package        sudo apt-get install dataset-fashion-mnist   (-> /usr/share/datasets/fashion-mnist)\n'
        '  4. torchvision download  python -c "import torchvision; torchvision.datasets.FashionMNIST('
        "'~/.cache/scalekd', download=True)\"   (needs network)")


def find_fashion_mnist(data_dir: Optional[Union[str, Path]] = None, download: bool = True,
                       debian_dir: Path = DEBIAN_DIR) -> Path:
    """The folder with the four IDX files, by the search order of this module."""
    tried = []
    candidates = [('--data', data_dir), ('$SCALEKD_DATA', os.environ.get('SCALEKD_DATA')),
                  ('Debian package', debian_dir)]
    for label, folder in candidates:
        if not folder:
            tried.append(f'{label}: not set')
            continue
        folder = Path(folder).expanduser()
        for sub in (folder, folder / 'FashionMNIST' / 'raw'):
            if has_fashion_mnist(sub):
                return sub
        tried.append(f'{label}: {folder} (no IDX files)')
        if label == '--data':  # an explicit folder that lacks the files is an error of its own
            raise _not_found(tried)
    cache = Path('~/.cache/scalekd').expanduser()
    if download:
        try:
            import torchvision
            torchvision.datasets.FashionMNIST(str(cache), download=True)
            return cache / 'FashionMNIST' / 'raw'
        except Exception as e:  # no network, refused, ...
            tried.append(f'torchvision download to {cache}: {type(e).__name__}: {str(e).splitlines()[0][:120]}')
    else:
        tried.append('torchvision download: disabled')
    raise _not_found(tried)


class FashionMNIST(Dataset):
    """One split (``train`` or ``test``) as grey PIL images through ``transform``."""

    def __init__(self, folder: Union[str, Path], split: str = 'train', transform: Optional[Callable] = None):
        if split not in FILES:
            raise FashionMNISTError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        folder = Path(folder)
        images_file, labels_file = (_idx_path(folder, stem) for stem in FILES[split])
        if images_file is None or labels_file is None:
            raise DatasetNotFound(f'{folder} lacks the Fashion-MNIST {split} IDX files')
        self.images = read_idx(images_file)
        self.targets = read_idx(labels_file).astype(np.int64)
        if self.images.ndim != 3 or self.images.shape[1:] != (28, 28) or self.images.dtype != np.uint8:
            raise FashionMNISTError(f'{images_file}: expected uint8 images of 28x28, got {self.images.dtype} {self.images.shape}')
        if self.targets.shape != (len(self.images),):
            raise FashionMNISTError(f'{labels_file}: {self.targets.shape[0]} labels for {len(self.images)} images')
        if self.targets.min() < 0 or self.targets.max() >= len(CLASSES):
            raise FashionMNISTError(f'{labels_file}: labels outside 0..{len(CLASSES) - 1}')
        self.transform = transform
        self.classes = CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tuple:
        img = Image.fromarray(self.images[index], mode='L')
        return (self.transform(img) if self.transform is not None else img), int(self.targets[index])
