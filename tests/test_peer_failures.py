"""A process of a 2-process gloo group that fails or is lost: the other ranks end at once, in one line
(see rank_faults.py for what each rank does)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scalekd.engine.runtime.distributed import lost_peer

SCRIPT = str(Path(__file__).with_name('rank_faults.py'))
GLOO_RESET = ('[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:23265: Connection '
              'reset by peer. This is typically caused by a remote worker hanging or bugs in the application.')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _two_ranks(*args: str):
    """Both ranks' (exit code, stderr), each started as torchrun starts it."""
    env = dict(os.environ, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()), WORLD_SIZE='2',
               OMP_NUM_THREADS='1')
    ranks = [subprocess.Popen([sys.executable, SCRIPT, *args], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        return [(p.wait(timeout=120), p.stderr.read()) for p in ranks]
    finally:
        for p in ranks:
            p.kill()


@pytest.mark.slow  # two processes start torch
def test_every_rank_raises_at_once_when_the_main_process_refuses_or_fails(tmp_path):
    """A user error on the main process reaches the other ranks as its message; any other error (here a
    FileNotFoundError, once taken for a user error and never sent) as a line naming its type; no rank
    waits for the group's 30 s timeout."""
    assert [code for code, _ in _two_ranks('refusals', str(tmp_path))] == [0, 0]
    main, other = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1))
    assert [(e['type'], e['message']) for e in main] == [
        ('CheckpointError', 'output folder run holds no checkpoint that loads'),
        ('FileNotFoundError', 'a file the main process needed')]
    assert [(e['type'], e['message']) for e in other] == [
        ('RankError', 'output folder run holds no checkpoint that loads'),
        ('PeerFailure', 'the main process failed (FileNotFoundError): see its traceback')]
    assert max(e['seconds'] for e in other) < 10


@pytest.mark.slow  # two processes start torch
def test_a_lost_peer_is_one_line_naming_it():
    (code, err), _ = _two_ranks('lost')
    assert code == 1 and 'Traceback' not in err, err
    assert err.strip().splitlines()[-1] == ('scalekd export: error: rank 1 was lost: it ended or was killed '
                                            '(the launcher reports how)')


@pytest.mark.parametrize('rank,world,text,line', [
    ('1', '2', GLOO_RESET, 'rank 0 was lost: it ended or was killed (the launcher reports how)'),
    ('3', '8', GLOO_RESET, 'a peer process was lost: it ended or was killed (the launcher reports how)'),
    ('0', '2', '[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 1800000ms for recv operation to complete',
     'rank 1 did not answer within train.dist_timeout_s: it is stopped or hung'),
    ('0', '2', 'CUDA error: an illegal memory access was encountered', None),
])
def test_what_a_lost_peer_is_called(monkeypatch, rank, world, text, line):
    monkeypatch.setenv('RANK', rank)
    monkeypatch.setenv('WORLD_SIZE', world)
    assert lost_peer(RuntimeError(text)) == line
    assert lost_peer(ValueError(text)) is None
