"""``scripts/gpu_check``: the first command to run on a new GPU machine (docs/gpu.md).

One command, within a time budget, each part in its own process with its own timeout (a part that
hangs is killed and the others still run):

- ``tests``: ``pytest -m cuda tests/test_cuda.py``, the CUDA paths against the CPU;
- ``bench ...``: ``scalekd bench`` of the paper's Swin-L -> ResNet-50-D at 224 with random weights,
  variants student / KD / ScaleKD, channels_last: bf16 at batch 64 and 128, eager and compiled (KD and
  ScaleKD), and fp32 eager at 64 (for the bf16 / fp32 ratio);
- ``demo``: 100 steps of the demo's CNN run (``configs/demo/cnn-scalekd.yaml``) with its real loader,
  on Fashion-MNIST where it is found, else on generated IDX files of the same shape (random pixels);
- ``loader``: ``scalekd bench --loader`` of the Swin-L -> ResNet-50 config's transforms on generated
  ImageNet-sized JPEGs.

The parts run most important first, so that a budget cut leaves out the extras. ``summary.json`` and
``summary.txt`` go to the output folder, every part's output to ``logs/``. ``tiny=True`` runs every
part at a tiny size (the CPU mode CI runs: its figures check the plumbing, nothing else).
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from .paper_pairs import PAPER_PAIRS

__all__ = ['Part', 'plan', 'run_part', 'run_check', 'format_summary', 'write_idx', 'demo_data', 'make_jpeg_folder',
           'main']

DEMO_CONFIG = 'configs/demo/cnn-scalekd.yaml'
LOADER_CONFIG = 'configs/table3/swin_l-resnet50.yaml'
MIN_PART_S = 15  # a part is not started with less of the budget left
BENCH_VARIANTS = 'student,kd,scalekd'
COMPILED_VARIANTS = 'kd,scalekd'  # what the ratios read: compiling the student alone too costs a minute more


@dataclass
class Part:
    """One part of the check: its command (run in the repository), timeout, and how its output reads."""
    name: str
    command: List[str]
    timeout_s: float
    read: Callable[[str], Dict[str, Any]]  # the part's stdout -> its result (may name a 'status')
    prepare: Optional[Callable[[], None]] = None  # what the part needs on disk, made only if it runs
    skip: Optional[str] = None  # why the part cannot run here


@dataclass(frozen=True)
class Sizes:
    """What each part runs, at full or tiny size."""
    teacher: str
    student: str
    img_size: int
    options: Dict[str, Any]
    batches: Sequence[int]        # the bench's two batch sizes (the tiny check keeps the first)
    steps: int                    # timed bench steps
    demo_steps: int
    demo_batch: int
    demo_interval: int
    loader_workers: Sequence[int]
    loader_batch: int
    loader_batches: int
    jpeg_size: Sequence[int]      # (width, height)
    jpegs_per_class: int
    timeouts: Dict[str, float]
    budget_s: float


FULL = Sizes(teacher=PAPER_PAIRS['swin_l-resnet50'].teacher, student=PAPER_PAIRS['swin_l-resnet50'].student,
             img_size=224, options=PAPER_PAIRS['swin_l-resnet50'].options, batches=(64, 128), steps=10,
             demo_steps=100, demo_batch=32, demo_interval=50, loader_workers=(4, 8, 16), loader_batch=128,
             loader_batches=8, jpeg_size=(500, 375), jpegs_per_class=300,
             timeouts=dict(tests=240, eager=120, compiled=240, demo=120, loader=90), budget_s=450)
TINY = Sizes(teacher='vit_tiny_patch16_224', student='resnet18', img_size=32, options={}, batches=(2,), steps=1,
             demo_steps=5, demo_batch=8, demo_interval=1, loader_workers=(0, 1), loader_batch=4, loader_batches=2,
             jpeg_size=(64, 48), jpegs_per_class=6,
             timeouts=dict(tests=120, eager=120, compiled=120, demo=120, loader=120), budget_s=300)


# -- data the parts read ---------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> Path:
    """An uncompressed IDX file of unsigned bytes: magic ``0 0 8 ndim``, big-endian dims, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())
    return path


def demo_data(given: Optional[str], folder: Path, train: int, test: int) -> Dict[str, str]:
    """The Fashion-MNIST folder of the demo part: the real files where found (``given``, then the
    usual places, never a download), else ``train`` / ``test`` random 28x28 images with labels
    ``i % 10`` written to ``folder`` as the four IDX files."""
    from ..engine.inputs.fashion_mnist import DatasetNotFound, find_fashion_mnist
    try:
        return dict(root=str(find_fashion_mnist(given, download=False)), kind='Fashion-MNIST')
    except DatasetNotFound:
        if given:
            raise
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (('train', train), ('t10k', test)):
        write_idx(folder / f'{split}-images-idx3-ubyte', rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f'{split}-labels-idx1-ubyte', np.arange(n) % 10)
    return dict(root=str(folder), kind='generated IDX files of Fashion-MNIST\'s shape (random pixels)')


def make_jpeg_folder(root: Path, classes: int, per_class: int, size: Sequence[int]) -> Path:
    """``train/`` and ``val/`` class folders of random JPEGs of ``size`` (w, h): smooth colour fields with
    grain, at quality 90 about the file size of an ImageNet photo of that size."""
    rng = np.random.default_rng(0)
    for split, count in (('train', per_class), ('val', 1)):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
                smooth = np.asarray(Image.fromarray(coarse).resize(tuple(size), Image.BICUBIC), dtype=np.float32)
                grain = rng.normal(0, 24, smooth.shape)
                Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(folder / f'{i}.jpg', quality=90)
    return root


# -- reading each part's output ------------------------------------------------------------------------

def read_junit(path: Path) -> Dict[str, Any]:
    """Counts of a pytest JUnit XML file, the failed tests with their first message line, the skip reasons."""
    suite = ElementTree.parse(path).getroot()
    suite = suite.find('testsuite') if suite.tag == 'testsuites' else suite
    failed, reasons = [], set()
    for case in suite.iter('testcase'):
        for bad in list(case.findall('failure')) + list(case.findall('error')):
            failed.append(dict(test=case.get('name'), message=(bad.get('message') or '').splitlines()[0][:300]))
        for skipped in case.findall('skipped'):
            reasons.add(skipped.get('message') or '')
    counts = {k: int(suite.get(k, 0)) for k in ('tests', 'failures', 'errors', 'skipped')}
    passed = counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']
    result = dict(passed=passed, failed=counts['failures'] + counts['errors'], skipped=counts['skipped'],
                  failures=failed, skip_reasons=sorted(reasons))
    if not passed and not failed:
        result['status'] = 'skipped'
    return result


def read_bench(stdout: str) -> Dict[str, Any]:
    report = json.loads(stdout)
    rows = {r['name']: dict(step_s=r['step_s'], images_per_s=r['images_per_s'], peak_mb=r['peak_mb'])
            for r in report['variants']}
    return dict(device=report['device'], precision=report['precision'], batch=report['batch'],
                compile=report.get('compile_backend'), variants=rows)


def read_demo(run: Path, batch: int) -> Dict[str, Any]:
    """Steps, images / s over the epoch and between its last two logged steps (warm-up left out), the
    peak memory, from the run's ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    steps = [r for r in records if 'loss' in r]
    epoch = [r for r in records if 'train_img_per_s' in r][-1]
    (a, b) = steps[-2:]
    return dict(steps=epoch['step'], images_per_s=epoch['train_img_per_s'],
                steady_images_per_s=(b['step'] - a['step']) * batch / (b['time'] - a['time']),
                steady_steps=[a['step'], b['step']], peak_mb=epoch['train_peak_mem_mb'], loss=b['loss'])


def read_loader(stdout: str) -> Dict[str, Any]:
    report = json.loads(stdout)
    return dict(batch=report['batch'], img_size=report['img_size'], cpus=report['cpus'],
                rows=[dict(workers=r['workers'], images_per_s=r['images_per_s'], first_batch_s=r['first_batch_s'])
                      for r in report['rows']])


# -- the plan -------------------------------------------------------------------------------------------

def _cli(*args: str) -> List[str]:
    return [sys.executable, '-m', 'scalekd.cli', *map(str, args)]


def _variants(tiny: bool, compiled: bool) -> str:
    return ('scalekd' if tiny else COMPILED_VARIANTS) if compiled else BENCH_VARIANTS


def _bench(sizes: Sizes, device: str, tiny: bool, precision: str, batch: int, compiled: bool) -> Part:
    name = f"bench {precision} {'compiled' if compiled else 'eager'} {batch}"
    command = _cli('bench', '--teacher', sizes.teacher, '--student', sizes.student, '--img-size', sizes.img_size,
                   '--batch', batch, '--steps', sizes.steps, '--precision', precision, '--channels-last',
                   '--device', device, '--variants', _variants(tiny, compiled), '--json',
                   *[a for k, v in sizes.options.items() for a in ('--option', f'{k}={v}')])
    if compiled:
        command += ['--compile'] + (['--compile-backend', 'eager'] if tiny else [])
    if tiny:  # one process, and ScaleKD alone compiled: the tiny check stays about a minute on two cores
        command.append('--in-process')
    return Part(name, command, sizes.timeouts['compiled' if compiled else 'eager'], read_bench)


def plan(out: Path, device: str, tiny: bool, data: Optional[str] = None, pytest_found: bool = True) -> List[Part]:
    """The parts of the check, most important first."""
    sizes = TINY if tiny else FULL
    logs = out / 'logs'
    tests = Part('tests', [sys.executable, '-m', 'pytest', '-m', 'cuda', 'tests/test_cuda.py', '-q', '-rs',
                           '-p', 'no:cacheprovider', '--junitxml', str(logs / 'tests.xml')],
                 sizes.timeouts['tests'], lambda _: read_junit(logs / 'tests.xml'),
                 skip=None if pytest_found else 'pytest is not installed here: bring its wheel and its '
                                                'dependencies (pip download pytest -d wheels/)')
    first, *more = sizes.batches
    demo_run, demo_folder = out / 'demo-run', out / 'fashion-mnist-generated'
    train_images, test_images = sizes.demo_steps * sizes.demo_batch, 10 * sizes.demo_batch
    demo_source: Dict[str, str] = {}
    demo = Part('demo', _cli(
        'train', DEMO_CONFIG, '--device', device, '--force', '--no-progress', '-o', f'output={demo_run}',
        '-o', f'data.train_subset={train_images}', '-o', f'data.val_subset={test_images}',
        '-o', f'train.batch_size={sizes.demo_batch}', '-o', 'sched.epochs=1', '-o', 'sched.warmup_epochs=0',
        '-o', 'log.console=false', '-o', f'log.interval={sizes.demo_interval}'),
        sizes.timeouts['demo'], lambda _: dict(read_demo(demo_run, sizes.demo_batch), data=demo_source['kind']))

    def prepare_demo() -> None:
        demo_source.update(demo_data(data, demo_folder, train_images, test_images))
        demo.command += ['-o', f"data.root={demo_source['root']}"]
    demo.prepare = prepare_demo
    jpegs = out / 'loader-jpegs'
    cpus = os.cpu_count() or 1
    workers = [w for w in sizes.loader_workers if w <= cpus] or [cpus]
    loader = Part('loader', _cli(
        'bench', '--loader', LOADER_CONFIG, '-o', f'data.root={jpegs}', '-o', 'data.num_classes=4',
        '--workers', ','.join(map(str, workers)), '--batch', sizes.loader_batch, '--batches', sizes.loader_batches,
        '--device', device, '--json'), sizes.timeouts['loader'], read_loader,
        prepare=lambda: make_jpeg_folder(jpegs, 4, sizes.jpegs_per_class, sizes.jpeg_size))
    eager = [_bench(sizes, device, tiny, 'bf16', b, False) for b in sizes.batches]
    compiled = [_bench(sizes, device, tiny, 'bf16', b, True) for b in sizes.batches]
    return [tests, *eager, demo, *compiled, _bench(sizes, device, tiny, 'fp32', first, False), loader]


# -- running it -----------------------------------------------------------------------------------------

def _tail(path: Path, lines: int = 8) -> str:
    return '\n'.join(path.read_text(errors='replace').splitlines()[-lines:]) if path.exists() else ''


def run_part(part: Part, logs: Path, cwd: Path, timeout_s: float) -> Dict[str, Any]:
    """Run one part in its own process group, killed (with its children) after ``timeout_s``; its record."""
    logs.mkdir(parents=True, exist_ok=True)
    stem = part.name.replace(' ', '-')
    stdout, stderr = logs / f'{stem}.out', logs / f'{stem}.err'
    record: Dict[str, Any] = dict(command=' '.join(part.command), timeout_s=round(timeout_s, 1),
                                  log=[str(stdout), str(stderr)])
    start = time.monotonic()
    try:
        if part.prepare is not None:
            part.prepare()
            record['command'] = ' '.join(part.command)
        with open(stdout, 'w') as out, open(stderr, 'w') as err:
            proc = subprocess.Popen(part.command, cwd=cwd, stdout=out, stderr=err, start_new_session=True)
            try:
                code: Optional[int] = proc.wait(timeout=max(timeout_s - (time.monotonic() - start), 1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
    except Exception as e:  # the part could not start (its data, its command)
        return dict(record, status='failed', seconds=round(time.monotonic() - start, 1), error=f'{type(e).__name__}: {e}')
    record['seconds'] = round(time.monotonic() - start, 1)
    if code is None:
        return dict(record, status='timeout', error_tail=_tail(stderr))
    record.update(status='ok' if code == 0 else 'failed', exit_code=code)
    try:
        result = part.read(stdout.read_text())
        if record['status'] == 'ok':
            record['status'] = result.pop('status', 'ok')
        result.pop('status', None)
        record['result'] = result
    except Exception as e:
        if record['status'] == 'ok':
            record.update(status='failed', error=f'reading its output: {type(e).__name__}: {e}')
    if record['status'] == 'failed':
        record['error_tail'] = _tail(stderr)
    return record


def ratios(parts: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    """Step-time ratios of the bench parts: ScaleKD / KD in each, compiled / eager and bf16 / fp32 (ScaleKD)."""
    bench = {name: p['result'] for name, p in parts.items() if name.startswith('bench') and 'result' in p}
    out = {}
    for name, r in bench.items():
        v = r['variants']
        if 'scalekd' in v and 'kd' in v:
            out[f'{name}: scalekd / kd'] = v['scalekd']['step_s'] / v['kd']['step_s']
    for name, r in bench.items():
        for other, ratio in ((name.replace('compiled', 'eager'), 'compiled / eager'),
                             (name.replace('bf16', 'fp32'), 'bf16 / fp32')):
            if other != name and other in bench and 'scalekd' in r['variants'] and 'scalekd' in bench[other]['variants']:
                out[f"{name.replace('bench ', '')}: {ratio}"] = \
                    r['variants']['scalekd']['step_s'] / bench[other]['variants']['scalekd']['step_s']
    return out


def _environment(device: str) -> Dict[str, Any]:
    import timm
    import torch
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith('cuda') else platform.processor() \
        or platform.machine()
    return dict(device=device, device_name=name, torch=torch.__version__, cuda=torch.version.cuda,
                timm=timm.__version__, python=platform.python_version(), cpus=os.cpu_count())


def run_check(parts: Sequence[Part], out: Path, cwd: Path, budget_s: float, device: str, tiny: bool,
              say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run the parts in order within ``budget_s`` seconds; the summary (also written to ``out``)."""
    start, records = time.monotonic(), {}
    started = datetime.now(timezone.utc).isoformat(timespec='seconds')
    for part in parts:
        left = budget_s - (time.monotonic() - start)
        if part.skip:
            records[part.name] = dict(status='skipped', reason=part.skip)
        elif left < MIN_PART_S:
            records[part.name] = dict(status='not run', reason=f'the budget of {budget_s:.0f} s was spent')
        else:
            say(f'gpu_check: {part.name} (at most {min(part.timeout_s, left):.0f} s) ...')
            records[part.name] = run_part(part, out / 'logs', cwd, min(part.timeout_s, left))
        say(f'gpu_check: {part.name}: {records[part.name]["status"]}')
    summary = dict(mode='tiny' if tiny else 'full', started=started, **_environment(device), budget_s=budget_s,
                   seconds=round(time.monotonic() - start, 1), parts=records, ratios=ratios(records))
    summary['ok'] = all(r['status'] in ('ok', 'skipped') for r in records.values())
    (out / 'summary.json').write_text(json.dumps(summary, indent=2))
    (out / 'summary.txt').write_text(format_summary(summary) + '\n')
    return summary


def _note(name: str, part: Dict[str, Any]) -> str:
    """The test counts, or why a part did not run or failed (its error's last line)."""
    result = part.get('result', {})
    if name == 'tests' and result:
        return f"{result['passed']} passed, {result['failed']} failed, {result['skipped']} skipped"
    last = (part.get('error_tail') or '').splitlines()[-1:]
    return (part.get('reason') or part.get('error') or (last[0] if last else ''))[:120]


def format_summary(summary: Dict[str, Any]) -> str:
    """The parts' statuses, the bench table, the ratios, the demo and loader figures."""
    s, parts = summary, summary['parts']
    lines = [f"scalekd GPU check ({s['mode']}) on {s['device_name']} ({s['device']}): torch {s['torch']}, CUDA "
             f"{s['cuda']}, timm {s['timm']}; {s['seconds']:.0f} s of a {s['budget_s']:.0f} s budget",
             f"{'part':<24} {'status':<8} {'seconds':>8}  note"]
    for name, p in parts.items():
        lines.append(f"{name:<24} {p['status']:<8} {p.get('seconds', 0):>8.1f}  {_note(name, p)}")
    for f in parts.get('tests', {}).get('result', {}).get('failures', []):
        lines.append(f"  FAILED {f['test']}: {f['message'][:150]}")
    bench = [(n, p['result']) for n, p in parts.items() if n.startswith('bench') and 'result' in p]
    if bench:
        peak = 'from the CUDA allocator' if s['device'] != 'cpu' else 'as RSS'
        lines += ['', f"bench (channels_last; peak memory {peak})",
                  f"{'setup':<24} {'variant':<8} {'step s':>8} {'img/s':>9} {'peak MB':>9}"]
        for name, r in bench:
            for variant, v in r['variants'].items():
                lines.append(f"{name.replace('bench ', ''):<24} {variant:<8} {v['step_s']:>8.4f} "
                             f"{v['images_per_s']:>9.1f} {v['peak_mb']:>9.0f}")
    if s['ratios']:
        lines += ['', 'step-time ratios: ' + '; '.join(f'{k} {v:.2f}' for k, v in s['ratios'].items())]
    demo = parts.get('demo', {}).get('result')
    if demo:
        lines += ['', f"demo CNN run on {demo['data']}: {demo['steps']} steps, {demo['images_per_s']:.0f} img/s over "
                      f"the epoch, {demo['steady_images_per_s']:.0f} img/s between steps {demo['steady_steps'][0]} "
                      f"and {demo['steady_steps'][1]}, peak {demo['peak_mb']:.0f} MB"]
    loader = parts.get('loader', {}).get('result')
    if loader:
        lines += ['', f"loader ({LOADER_CONFIG} transforms, {loader['img_size']} px, batch {loader['batch']}, "
                      f"{loader['cpus']} CPUs): " + ', '.join(f"{r['workers']} workers {r['images_per_s']:.0f} img/s"
                                                         for r in loader['rows'])]
    return '\n'.join(lines)


def main(argv: Optional[List[str]] = None, repo: Optional[Path] = None) -> int:
    """``scripts/gpu_check``: exit code 0 when every part passed (or was skipped), else 1."""
    import importlib.util
    p = argparse.ArgumentParser(prog='scripts/gpu_check', description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='runs/gpu_check', help='output folder (default runs/gpu_check)')
    p.add_argument('--device', default='cuda', help='cuda (default), cuda:N or cpu')
    p.add_argument('--tiny', action='store_true', help='every part at a tiny size (CI runs it on the CPU)')
    p.add_argument('--budget', type=float, help='seconds for the whole check (default 450; --tiny 300)')
    p.add_argument('--parts', help='comma-separated subset: tests, bench, demo, loader (default all)')
    p.add_argument('--data', help='folder with the Fashion-MNIST IDX files for the demo part (default: the usual '
                                  'places, else generated ones)')
    args = p.parse_args(argv)
    repo = repo or Path(__file__).resolve().parents[3]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    parts = plan(out, args.device, args.tiny, args.data, pytest_found=importlib.util.find_spec('pytest') is not None)
    if args.parts:
        wanted = [w.strip() for w in args.parts.split(',') if w.strip()]
        parts = [part for part in parts if any(part.name.split()[0] == w for w in wanted)]
    budget = args.budget or (TINY if args.tiny else FULL).budget_s
    summary = run_check(parts, out, repo, budget, args.device, args.tiny)
    print(format_summary(summary))
    print(f'wrote {out / "summary.json"} and {out / "summary.txt"}')
    return 0 if summary['ok'] else 1
