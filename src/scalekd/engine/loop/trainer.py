"""A training run: its output folder, its objects built from the config, the epochs of its loop,
validation, the best epoch and the checkpoints that let it resume."""
from pathlib import Path
from typing import Any, Dict, List, Optional

from ..run_folder.checkpoint import checkpoint_name, read_training_checkpoint
from ..inputs.config import RunConfig, config_to_dict, save_config
from ..runtime.determinism import enable_determinism
from ..runtime.distributed import DistEnv, barrier, on_main
from .epoch_loop import EpochLoop
from .epoch_losses import EpochLosses
from ..errors import RunError, RunInterrupted
from .evaluation import evaluate, evaluate_terms
from ..runtime.memory import reset_peak_memory
from ..runtime.precision import resolve_precision, resolve_teacher_dtype
from ..run_folder.files import check_output_path
from .run_logger import RunLogger
from ..run_folder.history import RunOutput, check_resume_request
from ..run_folder.optimizer_shards import checkpoint_optimizer_state
from .run_parts import RunParts, build_run_parts
from ..run_folder.training_state import Progress, TrainingState, changed_settings, gather_rng_states, restore_rng_states

__all__ = ['Trainer']


class Trainer:
    """One run, built from its config (models, data, optimiser, schedule, logging), trained to its last
    epoch by :class:`~scalekd.engine.loop.epoch_loop.EpochLoop`.

    Args:
        cfg: the validated run config.
        env: this process's place in the (possibly distributed) run.
        resume: ``None``, ``'auto'`` (newest complete checkpoint in the output folder, if any) or a path.
        force: start afresh in an output folder that holds another run (deleting only its files).

    The main process holds the output folder (:class:`~scalekd.engine.run_folder.history.RunOutput`) from here
    to the end of :meth:`fit`. Lines marked "every rank" are collectives: each rank reaches them together.
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, resume: Optional[str] = None, force: bool = False):
        self.cfg, self.env = cfg, env
        tcfg = cfg.train
        check_resume_request(resume, force)
        self.precision = resolve_precision(tcfg.precision, env.device)
        resolve_teacher_dtype(tcfg.teacher_precision, env.device)  # a refusal before the output folder is touched
        if tcfg.batch_size % (env.world_size * tcfg.accum_steps):
            raise RunError(f'train.batch_size {tcfg.batch_size} does not split over {env.world_size} process(es) '
                           f'x {tcfg.accum_steps} accumulation step(s)')
        self.batch_per_rank = tcfg.batch_size // (env.world_size * tcfg.accum_steps)
        if tcfg.deterministic:
            enable_determinism(env.device)
        self.out_dir = check_output_path(cfg.output)
        self._notes: List[str] = []  # said in the log once it is open
        self.output = RunOutput(cfg.output, tcfg.keep_checkpoints, self._notes.append,
                                ('config.yaml', *RunLogger.files(cfg.log))) if env.is_main else None
        # every rank: the main process opens the folder, every rank learns the checkpoint it resumes from
        self.resumed_from: Optional[Path] = on_main(lambda: self.output.open(resume, force), env)
        try:
            self._build(resume is not None)
        except BaseException:
            if self.output is not None:
                self.output.release(failed=True)
            raise

    @property
    def task(self):
        """The run's distiller."""
        return self.parts.task

    def _build(self, resuming: bool) -> None:
        cfg, env = self.cfg, self.env
        self.parts: RunParts = build_run_parts(cfg, env, self.precision, self.batch_per_rank, self._notes.append)
        parts = self.parts
        self.training_state = TrainingState(cfg, parts.task, parts.optimizer, parts.scaler, parts.ema)
        self.progress = Progress()
        self.losses = EpochLosses(env.device, cfg.train.accum_steps * env.world_size)
        if self.resumed_from is not None:
            self._resume()
        # every rank: before anything is written, the main process checks the folder has room for checkpoints
        on_main(lambda: self.output.check_space(self.training_state.checkpoint_bytes()), env)
        if env.is_main:
            self.output.start(fresh=not resuming)
            save_config(cfg, self.out_dir / 'config.yaml')
        barrier(env)  # every rank
        self.logger = RunLogger(self.out_dir, cfg.log, enabled=env.is_main, wandb_config=config_to_dict(cfg),
                                start_step=self.progress.step)
        for note in self._notes:
            self.logger.info(note)
        if self.resumed_from is not None:
            p = self.progress
            self.logger.info(f'resumed from {self.resumed_from} at epoch {p.epoch} + {p.updates} updates, step {p.step}')
        if not reset_peak_memory(env.device):  # peak memory figures: of the training, not of the build
            self.logger.info('peak memory figures include the model build: this system cannot reset the peak')
        self.loop = EpochLoop(parts, self.progress, self.losses, self.logger, self._save)

    def _resume(self) -> None:
        """Continue from the checkpoint :attr:`resumed_from` (the main process read it when opening the
        folder), on this run's number of processes and accumulation steps (the same global image
        position: an epoch is one global order dealt round-robin to the processes, see
        :class:`scalekd.engine.inputs.data.EpochSampler`), with the config's schedule from the resumed step on.
        The main process carries the epoch's loss sums, every rank the count of updates behind them."""
        main = self.output is not None
        state = self.output.take_resume_state() if main else read_training_checkpoint(self.resumed_from)
        resumed = self.training_state.load(state, self.resumed_from)
        self.progress = p = resumed.progress
        self.losses.load(resumed.loss_sums if main else dict.fromkeys(resumed.loss_sums, 0.0), resumed.loss_updates)
        self.parts.scheduler.step_update(p.step)
        restore_rng_states(resumed.rngs, self.env, self.cfg.seed + p.step)
        if main:
            changed = changed_settings(resumed.config, self.cfg)
            self._notes += [f'settings changed since the checkpoint, applied: {"; ".join(changed)}'] if changed else []
            self.output.reconcile_best(p, state)

    def _save(self, is_best: bool = False) -> Path:
        """Checkpoint the current state: every rank takes part (RNG streams and loss sums are gathered, each
        rank writes its shard of a sharded optimizer state), the main process writes the checkpoint file."""
        rngs = gather_rng_states(self.env)
        loss_sums, loss_updates = self.losses.global_sums(self.env)
        p = self.progress
        name = checkpoint_name(p.epoch, p.updates)
        optimizer_state = checkpoint_optimizer_state(self.parts.optimizer, self.env, self.output, name, p.step)
        if self.output is not None:
            state = self.training_state.state_dict(p, loss_sums, loss_updates, rngs, optimizer_state)
            self.output.write(state, name, p.step, is_best)
        return self.out_dir / name

    def fit(self) -> Dict[str, Any]:
        """Train from where the run stands to the last epoch; the best top-1 / top-5 and their epoch.

        SIGTERM and SIGINT finish the current step, save a checkpoint and raise
        :class:`~scalekd.engine.errors.RunInterrupted`. The output folder's lock is let go at the end,
        whatever happens.
        """
        try:
            with self.loop.stop.installed():
                return self._fit()
        except RunInterrupted:  # logged where the stop is taken
            raise
        except Exception as e:
            self.logger.failed(e)
            raise
        finally:
            self.logger.close()
            if self.output is not None:
                self.output.release()

    def _fit(self) -> Dict[str, Any]:
        p = self.progress
        self.logger.info(self.parts.summary(self.out_dir))
        for epoch in range(p.epoch, self.parts.epochs):
            train = self.loop.train_one_epoch(epoch)
            record = dict(epoch=epoch + 1, step=p.step, lr=self.parts.optimizer.param_groups[0]['lr'],
                          **{f'train_{k}': v for k, v in train.items()})
            is_best = self._validate(epoch, record)
            p.history.append(record)
            p.epoch = epoch + 1
            self.logger.metrics(record, p.step, 'epoch')
            self.logger.info(' '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in record.items()))
            self._save(is_best)
        self.logger.info(f'best top-1 {p.best_top1:.2f}  top-5 {p.best_top5:.2f}  (epoch {p.best_epoch})')
        return dict(top1=p.best_top1, top5=p.best_top5, epoch=p.best_epoch)

    def _validate(self, epoch: int, record: Dict[str, Any]) -> bool:
        """On the epochs of ``train.eval_every`` and the last: the student's (and EMA's) val metrics into
        ``record`` (every rank); whether the epoch is the best so far."""
        cfg, p = self.cfg, self.progress
        if (epoch + 1) % cfg.train.eval_every and epoch + 1 != self.parts.epochs:
            return False
        val = evaluate(self.task.student, self.parts.val_loader, self.env, self.precision, cfg.train.channels_last)
        record.update({f'val_{k}': v for k, v in val.items()})
        if cfg.train.eval_terms:
            terms = evaluate_terms(self.task, self.parts.val_loader, self.env, self.precision, cfg.train.channels_last)
            record.update({f'val_{"total_loss" if k == "loss" else k}': v for k, v in terms.items()})
        if self.parts.ema is not None:
            ema = evaluate(self.parts.ema.module, self.parts.val_loader, self.env, self.precision,
                           cfg.train.channels_last)
            record.update({f'ema_{k}': v for k, v in ema.items()})
            val = max(val, ema, key=lambda m: m['top1'])
        if val['top1'] <= p.best_top1:
            return False
        p.best_top1, p.best_top5, p.best_epoch, p.best_step = val['top1'], val['top5'], epoch + 1, p.step
        return True
