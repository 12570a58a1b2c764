"""``scalekd demo`` keeps what finished: stopped and run again, it reuses its finished runs (as ``scalekd ablate``
does) and trains the rest; it says the precision ``auto`` picked, and shows progress within a run."""
import json

import pytest
import torch

import scalekd.tools.demo as demo
from engine_fixtures import make_fashion_mnist
from scalekd.engine.runtime.precision import resolve_precision
from scalekd.tools.demo import DemoSettings, run_demo

pytestmark = pytest.mark.slow  # each demo trains its runs (a few seconds each)
TOY = dict(students=['cnn'], subset=64, epochs=2, batch_size=32, test_sample=40)
TRAIN = demo.train_and_test  # the real training, before any test replaces it


@pytest.fixture(scope='module')
def fashion_dir(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp('fmnist'), n_train=200, n_test=80)


def _settings(out, fashion_dir, **changes):
    return DemoSettings(output=str(out), data=str(fashion_dir), device=torch.device('cpu'), **dict(TOY, **changes))


def _trained(monkeypatch):
    """The labels of the runs trained from now on (the real training runs)."""
    trained = []

    def counting(cfg, test, env):
        trained.append(cfg.output.rsplit('/', 1)[-1])
        return TRAIN(cfg, test, env)
    monkeypatch.setattr(demo, 'train_and_test', counting)
    return trained


def test_a_stopped_demo_reuses_its_finished_runs_and_ends_as_an_uninterrupted_one(tmp_path, fashion_dir, monkeypatch):
    straight = run_demo(_settings(tmp_path / 'straight', fashion_dir), say=lambda m: None)

    def stop_at_scalekd(cfg, test, env):
        if cfg.output.endswith('cnn-scalekd'):
            raise KeyboardInterrupt  # Ctrl-C while the second run trains
        return TRAIN(cfg, test, env)
    monkeypatch.setattr(demo, 'train_and_test', stop_at_scalekd)
    with pytest.raises(KeyboardInterrupt):
        run_demo(_settings(tmp_path / 'out', fashion_dir), say=lambda m: None)
    assert (tmp_path / 'out' / 'cnn-alone' / 'result.json').is_file()
    assert not (tmp_path / 'out' / 'cnn-scalekd' / 'result.json').exists()

    trained, said = _trained(monkeypatch), []
    again = run_demo(_settings(tmp_path / 'out', fashion_dir), say=said.append)
    assert trained == ['cnn-scalekd']  # the finished run is read back, the stopped one trained
    assert 'cnn alone: test top-1' in said[2] and said[2].endswith('(finished earlier, reused)')
    for key in ('alone_top1', 'scalekd_top1', 'gain', 'curves'):  # the numbers of the uninterrupted demo
        assert again['students']['cnn'][key] == straight['students']['cnn'][key], key
    assert json.loads((tmp_path / 'out' / 'results.json').read_text())['students'] == again['students']


def test_a_run_of_other_settings_is_trained_again(tmp_path, fashion_dir, monkeypatch):
    run_demo(_settings(tmp_path / 'out', fashion_dir), say=lambda m: None)
    trained = _trained(monkeypatch)
    run_demo(_settings(tmp_path / 'out', fashion_dir, epochs=1), say=lambda m: None)
    assert trained == ['cnn-alone', 'cnn-scalekd']
    assert json.loads((tmp_path / 'out' / 'cnn-alone' / 'result.json').read_text())['config']['sched']['epochs'] == 1


def test_the_demo_says_its_precision_and_shows_progress_within_a_run(tmp_path, fashion_dir, capsys):
    said = []
    run_demo(_settings(tmp_path / 'out', fashion_dir, students=['cnn']), say=said.append)
    assert said[1] == f'students train in {resolve_precision("auto", torch.device("cpu"))} on cpu (precision auto)'
    err = capsys.readouterr().err  # not a terminal here: a line at the end of each epoch, no bar
    assert '\r' not in err
    for label in ('alone', 'scalekd'):
        assert f'cnn-{label} epoch 1/2: step 2/2, ' in err and f'cnn-{label} epoch 2/2: step 2/2, ' in err
