"""Files a command cannot write or will not load: one line naming the file and the cause, nothing
half-written left behind."""
import os

import pytest
import torch
from safetensors import SafetensorError

import scalekd.tools.export as export
from scalekd.cli import main
from scalekd.engine.inputs.weights import WeightsError, read_state_dict
from scalekd.engine.run_folder.checkpoint import CheckpointError, load_checkpoint
from test_model_files import run_files  # noqa: F401 (a fixture)

# what safetensors raises when the disk fills up under save_file
DISK_FULL = 'Error while serializing: I/O error: No space left on device (os error 28)'


def test_an_export_onto_a_full_disk_is_one_line_naming_the_file(run_files, tmp_path, monkeypatch, capsys):
    _, path, _, _ = run_files

    def full(state, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'x' * 100)  # the part that fitted
        raise SafetensorError(DISK_FULL)
    monkeypatch.setattr(export, 'save_file', full)
    assert main(['export', str(path), '--out', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f'scalekd export: error: writing {tmp_path / "out" / "model.safetensors"} failed: '
                                f'the disk is full; nothing was written']
    assert not (tmp_path / 'out').exists()


def test_an_export_into_a_folder_it_may_not_write_names_the_cause(run_files, tmp_path, monkeypatch, capsys):
    _, path, _, _ = run_files
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'notes.txt').write_text('mine')

    def denied(state, filename, metadata=None):
        raise SafetensorError('Error while serializing: I/O error: Permission denied (os error 13)')
    monkeypatch.setattr(export, 'save_file', denied)
    assert main(['export', str(path), '--out', str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f'scalekd export: error: export folder {tmp_path / "out"} cannot be written: Permission denied; nothing was '
        f'written']
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['notes.txt']


class _CallsOnLoad:
    """Pickles as a call of a function from a module a weights-only load blocks (harmless if ever run)."""

    def __reduce__(self):
        return os.getcwd, ()


def test_a_refused_pickle_names_the_global_and_how_to_go_on(tmp_path, capsys):
    torch.save({'w': torch.ones(1), 'meta': _CallsOnLoad()}, tmp_path / 'foreign.pth')
    assert main(['eval', str(tmp_path / 'foreign.pth'), '--data', str(tmp_path), '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err, err
    assert f'{tmp_path / "foreign.pth"} cannot be loaded safely (weights_only): Weights only load failed. ' in err
    assert f'The file names {os.getcwd.__module__}.getcwd, which a weights-only load never runs' in err
    assert 'convert it' in err and 'torch.save its state dict' in err


def test_a_checkpoint_that_names_a_refused_global_says_which(tmp_path):
    from scalekd.engine.run_folder.checkpoint import CheckpointError, read_training_checkpoint
    path = tmp_path / 'checkpoint-0001.pth'
    torch.save({'format': 3, 'progress': {}, 'meta': _CallsOnLoad()}, path)
    with pytest.raises(CheckpointError) as e:
        read_training_checkpoint(path)
    assert f'The file names {os.getcwd.__module__}.getcwd, which a weights-only load never runs' in str(e.value)


@pytest.mark.parametrize('content', [b'student: resnet50\n', bytes(range(256))], ids=['text', 'binary'])
def test_a_file_that_is_no_torch_file_says_so_for_checkpoints_and_weights(tmp_path, capsys, content):
    """Neither torch.save's zip archive nor a pickle: said in one line, not torch's unpickler detail."""
    path = tmp_path / 'checkpoint-0001.pth'
    path.write_bytes(content)
    said = f'it is not a PyTorch file (neither the zip archive torch.save writes nor a pickle; it starts with {content[:8]!r})'
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value) == f'checkpoint {path} cannot be loaded safely: {said}'
    with pytest.raises(WeightsError) as e:
        read_state_dict(path)
    assert str(e.value) == f'{path} cannot be loaded safely (weights_only): {said}'
    assert main(['eval', str(path), '--data', str(tmp_path), '--device', 'cpu']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and said in err, err
    assert path.read_bytes() == content  # never touched
