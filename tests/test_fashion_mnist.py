"""The Fashion-MNIST IDX reader and the search for the dataset (generated IDX files, no download)."""
import numpy as np
import pytest

from engine_fixtures import make_fashion_mnist as _fake_dataset, write_idx as _write_idx
from scalekd.engine.inputs.fashion_mnist import DatasetNotFound, FashionMNIST, FashionMNISTError, find_fashion_mnist, read_idx


def test_read_idx_parses_header_dims_and_data(tmp_path):
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    for gz in (False, True):
        path = _write_idx(tmp_path / f'x{gz}-idx3-ubyte', images, gz=gz)
        out = read_idx(path)
        assert out.shape == (2, 3, 4) and out.dtype == np.uint8 and (out == images).all()
    ints = _write_idx(tmp_path / 'ints', np.array([1, -2, 70000]), code=0x0C)
    assert read_idx(ints).tolist() == [1, -2, 70000]


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / 'bad').write_bytes(b'\x01\x02\x08\x01\x00\x00\x00\x02ab')
    with pytest.raises(FashionMNISTError, match='bad magic number'):
        read_idx(tmp_path / 'bad')
    path = _write_idx(tmp_path / 'short', np.zeros((4, 28, 28)))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(FashionMNISTError, match=r'expected 3136 for shape \(4, 28, 28\)'):
        read_idx(path)


def test_dataset_reads_real_shapes_and_checks_labels(tmp_path):
    folder = _fake_dataset(tmp_path)
    train, test = FashionMNIST(folder, 'train'), FashionMNIST(folder, 'test')
    assert (len(train), len(test)) == (6, 4)
    img, label = train[3]
    assert img.size == (28, 28) and img.mode == 'L' and label == 3
    _write_idx(folder / 't10k-labels-idx1-ubyte', np.array([0, 1, 2, 11]), gz=True)
    with pytest.raises(FashionMNISTError, match=r'labels outside 0..9'):
        FashionMNIST(folder, 'test')


def test_search_order_and_the_error_that_lists_every_option(tmp_path, monkeypatch):
    for d in ('explicit', 'env', 'debian'):
        (tmp_path / d).mkdir()
    explicit, env, debian = (_fake_dataset(tmp_path / d) for d in ('explicit', 'env', 'debian'))
    monkeypatch.setenv('SCALEKD_DATA', str(env))
    assert find_fashion_mnist(explicit, download=False, debian_dir=debian) == explicit
    assert find_fashion_mnist(None, download=False, debian_dir=debian) == env
    monkeypatch.delenv('SCALEKD_DATA')
    assert find_fashion_mnist(None, download=False, debian_dir=debian) == debian
    with pytest.raises(DatasetNotFound) as e:
        find_fashion_mnist(None, download=False, debian_dir=tmp_path / 'nowhere')
    message = str(e.value)
    for option in ('--data DIR', 'SCALEKD_DATA=DIR', 'apt-get install dataset-fashion-mnist',
                   'torchvision.datasets.FashionMNIST'):
        assert option in message
    with pytest.raises(DatasetNotFound, match=r'--data: .*empty \(no IDX files\)'):
        (tmp_path / 'empty').mkdir()
        find_fashion_mnist(tmp_path / 'empty', download=False, debian_dir=debian)
