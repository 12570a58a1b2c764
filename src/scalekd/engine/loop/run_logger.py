"""Run logging: console and ``train.log``, a JSON-lines metrics file, TensorBoard and (optional) W&B.

Only the main process writes; other ranks get a logger that stays silent.
"""
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional, TextIO, Tuple

from tqdm import tqdm

from ..inputs.config import LogConfig
from ..errors import ConfigError, UserError, error_line

__all__ = ['RunLogger', 'ProgressLines', 'rewind_metrics', 'write_text_atomic']


def rewind_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``path`` up to optimizer step ``step`` (a run resumed there redoes the
    rest); a torn last line of a killed write goes too. Rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get('step', 0) <= step:
            kept.append(line + '\n')
    write_text_atomic(path, ''.join(kept))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file beside it: a killed write leaves the old file or none."""
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(text)
    os.replace(tmp, path)


class ProgressLines:
    """Progress as whole lines, for output that is not a terminal (a log file, Slurm, ``nohup``): a line as
    a step starts when ``every_s`` seconds have passed since the last one, and as the last step starts (a
    loop may stop taking items there). Iterates like ``tqdm`` and takes its ``set_postfix``."""

    def __init__(self, iterable: Iterable, total: int, desc: str, every_s: float = 30.0, stream: Optional[TextIO] = None):
        self.iterable, self.total, self.desc, self.every_s = iterable, total, desc, every_s
        self.stream = stream or sys.stderr
        self.postfix: Dict[str, Any] = {}

    def set_postfix(self, values: Dict[str, Any], refresh: bool = True) -> None:
        self.postfix = dict(values)

    def __iter__(self) -> Iterator:
        start = last = time.monotonic()
        for n, item in enumerate(self.iterable, 1):
            now = time.monotonic()
            if n == self.total or now - last >= self.every_s:
                last = now
                terms = ''.join(f'  {k} {v}' for k, v in self.postfix.items())
                print(f'{self.desc}: step {n}/{self.total}, {now - start:.0f} s{terms}', file=self.stream, flush=True)
            yield item


class RunLogger:
    """Writes what a run reports. ``out_dir=None`` (non-main ranks, dry runs) writes no file."""

    def __init__(self, out_dir: Optional[Path], cfg: LogConfig, enabled: bool = True, wandb_config: Optional[dict] = None,
                 start_step: int = 0):
        self.enabled = enabled
        self.cfg = cfg
        self.log = logging.getLogger('scalekd')
        self.log.setLevel(logging.INFO)
        self.log.handlers.clear()
        self.log.propagate = False
        self.metrics_file = None
        self.file_handler: Optional[logging.Handler] = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if cfg.console:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter('%(message)s'))
            self.log.addHandler(handler)
        if out_dir is None:
            return
        self.file_handler = logging.FileHandler(out_dir / 'train.log')
        self.file_handler.setFormatter(logging.Formatter('%(asctime)s %(message)s'))
        self.log.addHandler(self.file_handler)
        rewind_metrics(out_dir / 'metrics.jsonl', start_step)
        self.metrics_file = open(out_dir / 'metrics.jsonl', 'a')
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(out_dir / 'tensorboard'), purge_step=start_step + 1)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError('log.wandb is on but the wandb package is not installed (pip install wandb)') from None
            self.wandb = wandb.init(project=cfg.wandb_project, dir=str(out_dir), config=wandb_config,
                                    name=out_dir.name, resume='allow')

    @staticmethod
    def files(cfg: LogConfig) -> Tuple[str, ...]:
        """The names of what the main process's logger writes in the output folder under ``cfg``."""
        return ('train.log', 'metrics.jsonl') + (('tensorboard',) if cfg.tensorboard else ()) + \
            (('wandb',) if cfg.wandb else ())

    def info(self, message: str) -> None:
        if self.enabled:
            self.log.info(message)

    def failed(self, error: BaseException) -> None:
        """The error that ended the run, in ``train.log`` alone (the command prints it): its one line, with
        the traceback of an error that is not a user's mistake."""
        if self.file_handler is None:
            return
        text = error_line(error) if isinstance(error, UserError) else ''.join(traceback.format_exception(error))
        self.file_handler.handle(self.log.makeRecord(self.log.name, logging.ERROR, __file__, 0,
                                                     f'stopped by an error: {text.rstrip()}', None, None))

    def progress(self, iterable: Iterable, total: int, desc: str):
        """The main process's progress over ``iterable`` on standard error: a bar on a terminal, a
        :class:`ProgressLines` line now and then otherwise (``log.progress`` true or false forces a bar or
        nothing)."""
        if not self.enabled or self.cfg.progress is False:
            return iterable
        if self.cfg.progress or sys.stderr.isatty():
            return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False, file=sys.stderr)
        return ProgressLines(iterable, total, desc)

    def metrics(self, record: Dict[str, Any], step: int, prefix: str) -> None:
        """One JSON line, plus TensorBoard / W&B scalars under ``prefix/``."""
        if not self.enabled:
            return
        record = dict(record, time=round(time.time(), 3))
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record) + '\n')
            self.metrics_file.flush()
        scalars = {f'{prefix}/{k}': v for k, v in record.items()
                   if isinstance(v, (int, float)) and k not in ('epoch', 'step', 'time')}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        for handler in list(self.log.handlers):
            handler.close()
            self.log.removeHandler(handler)
