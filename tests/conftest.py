import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """A tiny generated ImageFolder: 3 classes, 8 train and 4 val images each."""
    from engine_fixtures import make_image_folder
    return make_image_folder(tmp_path_factory.mktemp('data'), train_per_class=8, val_per_class=4)
