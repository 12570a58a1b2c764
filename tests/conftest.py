import os
import sys

# no network here: a hub lookup fails at once instead of retrying (set before huggingface_hub is imported)
os.environ.setdefault('HF_HUB_OFFLINE', '1')
if os.environ.get('PYTEST_XDIST_WORKER'):  # one thread per test process (and the processes a test starts)
    os.environ['OMP_NUM_THREADS'] = '1'

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
    """A tiny generated ImageFolder: 3 classes, 8 train and 4 val images each."""
    from engine_fixtures import make_image_folder
    return make_image_folder(tmp_path_factory.mktemp('data'), train_per_class=8, val_per_class=4)


@pytest.fixture(scope='session')
def straight(tmp_path_factory, data_root):
    """An uninterrupted, deterministic one-process run that checkpoints every step (6 steps: 2 epochs of
    3), with the samples of each step recorded in ``trace/``."""
    from engine_fixtures import tiny_config
    from scalekd.cli import main
    from traced_train import trace_samples
    tmp = tmp_path_factory.mktemp('straight')
    cfg = tiny_config(tmp, data_root, train=dict(checkpoint_every_steps=1, keep_checkpoints=20))
    undo = trace_samples(tmp / 'trace', rank=0)
    try:
        assert main(['train', str(cfg), '--deterministic']) == 0
    finally:
        undo()
    return tmp / 'run'
