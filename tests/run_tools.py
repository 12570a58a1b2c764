"""Starting training runs in child processes (one process or torchrun) and reading what they left."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

TRACED = str(Path(__file__).with_name('traced_train.py'))


def start(cfg: Path, *args: str, **env: str) -> subprocess.Popen:
    """``scalekd train cfg args`` in one child process (instrumented: see traced_train.py), with the
    test process's threads, so that its numbers match runs inside the test process bit for bit."""
    return subprocess.Popen([sys.executable, TRACED, 'train', str(cfg), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **env), start_new_session=True)


def start_torchrun(cfg: Path, *args: str, port: int, nproc: int = 2, **env: str) -> subprocess.Popen:
    """``torchrun --nproc_per_node N traced_train.py train cfg args``, in its own process group, one
    thread per process."""
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', str(nproc),
                             '--master_port', str(port), TRACED, 'train', str(cfg), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1', **env), start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a run that must succeed; its stderr."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (out[-2000:], err[-4000:])
    return err


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``path`` exists and is not empty (a line of metrics, a whole checkpoint)."""
    deadline = time.time() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f'{path} did not appear'
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started (torchrun's workers too)."""
    os.killpg(proc.pid, 9)
    proc.communicate()


MEASURED = ('time', 'train_img_per_s', 'train_peak_mem_mb')  # what the machine measures: differs between equal runs


def computed(record: dict) -> dict:
    """A metrics record without :data:`MEASURED`."""
    return {k: v for k, v in record.items() if k not in MEASURED}


def metrics(run: Path) -> List[dict]:
    return [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]


def step_lines(run: Path) -> List[dict]:
    return [r for r in metrics(run) if 'loss' in r]


def epoch_lines(run: Path) -> List[dict]:
    return [r for r in metrics(run) if 'train_loss' in r]


def samples_per_step(trace: Path, batch_per_rank: int, first_step: int = 1) -> Dict[int, List[int]]:
    """Step -> the sorted sample indices every rank trained on in it (one micro-batch per rank and step)."""
    steps: Dict[int, List[int]] = {}
    for f in sorted(trace.glob('rank*.txt')):
        indices = [int(line) for line in f.read_text().split()]
        for i in range(0, len(indices), batch_per_rank):
            steps.setdefault(first_step + i // batch_per_rank, []).extend(indices[i:i + batch_per_rank])
    return {k: sorted(v) for k, v in steps.items()}
