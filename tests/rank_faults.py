"""One rank of a 2-process gloo group (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set by the
test) that meets a fault, for ``test_peer_failures.py``.

Usage: ``python rank_faults.py refusals OUT`` (the main process refuses, then fails, inside ``on_main``;
each rank writes what it raised, and after how long, to ``OUT/rankN.json``) or ``python rank_faults.py
lost`` (rank 1 dies once the group is up; rank 0's ``scalekd export`` meets it in a collective).
"""
import json
import os
import sys
import time
from pathlib import Path

import torch

import scalekd.cli as cli
from scalekd.engine.run_folder.checkpoint import CheckpointError
from scalekd.engine.runtime.distributed import all_reduce_sum, barrier, init_distributed, on_main


def _refuse():
    raise CheckpointError('output folder run holds no checkpoint that loads')


def _fail():
    raise FileNotFoundError('a file the main process needed')  # not a user error: a defect


def refusals(out: Path) -> None:
    env = init_distributed('cpu', timeout_s=30)
    seen = []
    for fn in (_refuse, _fail):
        start = time.monotonic()
        try:
            on_main(fn, env)
        except Exception as e:
            seen.append(dict(type=type(e).__name__, message=str(e), seconds=time.monotonic() - start))
    (out / f'rank{env.rank}.json').write_text(json.dumps(seen))


def lost() -> int:
    env = init_distributed('cpu', timeout_s=30)
    barrier(env)
    if env.rank == 1:
        os._exit(9)  # as a rank killed by the out-of-memory killer

    def collective(args) -> int:
        for _ in range(100):
            all_reduce_sum({'x': 1.0}, env)
            time.sleep(0.05)
        return 0
    cli._run_export = collective
    return cli.main(['export', 'unused.pth', '--out', 'unused'])


if __name__ == '__main__':
    torch.set_num_threads(1)
    if sys.argv[1] == 'refusals':
        refusals(Path(sys.argv[2]))
        code = 0
    else:
        code = lost()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
