"""16-bit images are converted by scale (not clipped), and subsets can be class-balanced."""
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from engine_fixtures import make_fashion_mnist, make_image_folder
from scalekd.engine.inputs.data import CheckedImageDataset, DataError, seeded_subset
from scalekd.engine.inputs.fashion_mnist import FashionMNIST


def _folder_with(tmp_path, name, img):
    folder = tmp_path / 'images' / 'only'
    folder.mkdir(parents=True, exist_ok=True)
    img.save(folder / name)
    return CheckedImageDataset(str(tmp_path / 'images'), input_img_mode='L')


def test_16_bit_greyscale_is_scaled_to_8_bits(tmp_path):
    wide = np.array([[0, 257, 32896, 65535], [128, 1000, 40000, 65000]], dtype=np.uint16)
    dataset = _folder_with(tmp_path, 'deep.png', Image.fromarray(wide))
    assert Image.open(tmp_path / 'images' / 'only' / 'deep.png').mode.startswith('I')
    img, _ = dataset[0]
    # 16-bit v -> round(v * 255 / 65535): 257 -> 1, 32896 -> 128, 128 -> 0 (Pillow's own conversion gives 255)
    assert np.asarray(img).tolist() == [[0, 1, 128, 255], [0, 4, 156, 253]]


def test_16_bit_greyscale_becomes_grey_rgb(tmp_path):
    wide = np.full((3, 3), 32896, dtype=np.uint16)
    folder = tmp_path / 'images' / 'only'
    folder.mkdir(parents=True)
    Image.fromarray(wide).save(folder / 'deep.png')
    img, _ = CheckedImageDataset(str(tmp_path / 'images'), input_img_mode='RGB')[0]
    assert img.mode == 'RGB' and np.asarray(img).max() == np.asarray(img).min() == 128


def test_a_balanced_subset_takes_the_same_share_of_every_class(tmp_path):
    root = make_image_folder(tmp_path / 'data', train_per_class=12, val_per_class=1, size=8)
    dataset = CheckedImageDataset(str(root / 'train'))
    labels = [t for _, t in dataset.reader.samples]
    subset = seeded_subset(dataset, 8, seed=3, balanced=True)
    assert sorted(Counter(labels[i] for i in subset.indices).values()) == [2, 3, 3]  # 8 = 3 + 3 + 2
    assert subset.indices == sorted(subset.indices)
    assert seeded_subset(dataset, 8, seed=3, balanced=True).indices == subset.indices
    assert seeded_subset(dataset, 8, seed=4, balanced=True).indices != subset.indices
    dataset.reader.samples += [s for s in dataset.reader.samples if s[1] == 1][:3]  # classes of 12, 15, 12
    with pytest.raises(DataError, match='needs 13 of class 0, which has 12'):
        seeded_subset(dataset, 39, seed=0, balanced=True)


def test_a_balanced_subset_of_fashion_mnist_labels(tmp_path):
    folder = make_fashion_mnist(tmp_path / 'fm', n_train=100, n_test=10)
    dataset = FashionMNIST(folder, 'train', None)
    subset = seeded_subset(dataset, 30, seed=0, balanced=True)
    assert Counter(int(dataset.targets[i]) for i in subset.indices) == {c: 3 for c in range(10)}
