"""``python -m scalekd.tools.diagnosis``: the CAP-vs-FD figures read from a study's run folders."""
import json
import shutil

import pytest

from engine_fixtures import tiny_config
from scalekd.tools.diagnosis import diagnose, format_diagnosis, main


def _run(folder, config, first, last, top1, test_s4=None):
    folder.mkdir(parents=True)
    shutil.copy(config, folder / 'config.yaml')
    tested = {} if test_s4 is None else dict(val_s4_ori=test_s4)
    lines = [dict(loss=1.0, task_loss=2.0, epoch=1, step=1),  # a step line: not an epoch's means
             dict(epoch=1, step=3, train_task_loss=first[0], train_s4_ori=first[1]),
             dict(epoch=2, step=6, train_task_loss=last[0], train_s4_ori=last[1], val_loss=last[2], **tested)]
    (folder / 'metrics.jsonl').write_text('\n'.join(json.dumps(line) for line in lines) + '\n')
    (folder / 'result.json').write_text(json.dumps(dict(top1=top1)))


@pytest.mark.slow
def test_the_diagnosis_averages_each_rows_seeds(tmp_path, data_root, capsys):
    config = tiny_config(tmp_path, data_root, distill=dict(method='fd'))
    _run(tmp_path / 'out' / 'runs' / 'vit' / 'fd' / 'seed0', config, (2.0, 40.0), (0.5, 10.0, 0.9), 70.0, 12.0)
    _run(tmp_path / 'out' / 'runs' / 'vit' / 'fd' / 'seed1', config, (2.2, 60.0), (0.7, 20.0, 1.1), 72.0, 24.0)
    result = diagnose(tmp_path / 'out', ['vit'], ['fd', 'cap_dfm_tpp'])
    fd = result['vit']['fd']
    assert list(result['vit']) == ['fd']  # a row without runs is left out
    assert fd['seeds'] == 2 and fd['terms'] == {'s4_ori': (50.0, 15.0)} and fd['test_terms'] == {'s4_ori': 18.0}
    assert fd['curves']['s4_ori'] == dict(train=[(1, 50.0), (2, 15.0)], test=[(2, 18.0)])
    assert fd['curves']['task_loss']['train'] == [(1, 2.1), (2, 0.6)] and fd['curves']['task_loss']['test'] == []
    assert (fd['train_task'], fd['test_loss'], fd['top1']) == pytest.approx((0.6, 1.0, 71.0))
    assert fd['student_params'] > 0 and fd['projector_params'] > 0  # FD's linear projector on s4
    assert '| fd | 2 |' in format_diagnosis(result) and 's4_ori 50 -> 15 (0.30) | s4_ori 18 (1.20) |' in format_diagnosis(result)
    assert main(['--output', str(tmp_path / 'out'), '--students', 'vit', '--rows', 'fd']) == 0
    assert '| +0.400 | 71.00 |' in capsys.readouterr().out


def test_no_finished_runs_is_one_line(tmp_path, capsys):
    assert main(['--output', str(tmp_path), '--students', 'vit', '--rows', 'fd', '--plot', str(tmp_path / 'c.png')]) == 2
    err = capsys.readouterr().err
    assert err == f'python -m scalekd.tools.diagnosis: no finished runs of the rows fd under {tmp_path}/runs/<student>/\n'
    assert not (tmp_path / 'c.png').exists()
