"""``scalekd bench``: the training cost of each ScaleKD component, side by side (the paper's Table 15b).

Each variant runs in a fresh process so that its peak memory is its own, measured from the end of
the build (:mod:`scalekd.engine.runtime.memory`): on CUDA ``torch.cuda.max_memory_allocated``, on CPU the
process's peak resident set (which includes the Python / torch runtime and the models' weights, the
same for every variant, but not what building them took). With ``isolate=False`` (``--in-process``)
the variants run one after the other in the bench's own process: quicker to start, and on CUDA the
same figures (the allocator's peak is reset per variant); on CPU a variant's peak then includes what
the earlier ones left in the process. The step runs under a training run's default GPU switches
(``train.tf32``, ``train.cudnn_benchmark``: :mod:`scalekd.engine.runtime.cuda_settings`). Step time is the median
of ``steps`` timed training steps (forward, backward, SGD step) after one warm-up step. The variants
are the ablation presets (:data:`scalekd.method.options.ABLATIONS`); every one but ``student`` runs the
teacher's forward.

:func:`run_config_bench` benches a run config instead (several teachers too): its method beside the student
alone, and per teacher the parts of its step (forward, projectors), the peak memory each adds and its
parameters.
"""
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from timm.utils import unwrap_model

from ..engine.runtime.allocator import give_back_free_heap, keep_freed_memory
from ..engine.inputs.config import RunConfig, TrainConfig, load_config
from ..engine.inputs.task_build import build_task
from ..engine.runtime.cuda_settings import configure_backends
from ..engine.errors import UserError, error_line
from ..engine.runtime.memory import peak_memory_mb, reset_peak_memory
from ..engine.runtime.precision import autocast, cpu_has_fast_bf16, resolve_precision, resolve_teacher_dtype
from ..engine.loop.synthetic_step import synthetic_batch, training_step
from ..method.options import ABLATIONS, FEATURE_METHODS, DistillOptions, ablation
from ..task.builder import build_distiller
from ..task.distiller import Distiller
from ..task.report import param_counts, teacher_rows

__all__ = ['measure_variant', 'run_bench', 'run_config_bench', 'format_table', 'time_interleaved', 'cpu_name']


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def measure_variant(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Build one variant with random weights and time its training step (run in a fresh process); the
    variant named ``spec['parts']`` also times each part of its step and measures each teacher's."""
    device = torch.device(spec['device'])
    if device.type == 'cpu':
        keep_freed_memory()
    torch.manual_seed(0)
    task, precision, channels_last, compiled = _build_variant(spec, device)
    if compiled:  # as train.compile: the warm-up step and round compile, the timed ones do not
        task.compile(backend=spec.get('compile_backend') or 'inductor')
    params = [p for p in task.trainable_module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    images, targets = synthetic_batch(task, spec['batch'], channels_last)
    reset_peak_memory(device)

    def step() -> Dict[str, float]:
        return training_step(task, optimizer, images, targets, precision)

    losses = step()  # warm-up
    step_s = time_interleaved(dict(step=step), spec['steps'], device, warmup=False)['step']
    peak_mb = peak_memory_mb(device)  # of the training steps, before the diagnostics below add their own
    components = teachers = None
    if spec['variant'] == spec.get('parts'):
        parts = _component_parts(task, optimizer, images, targets, precision, step)
        components = time_interleaved(parts, spec['steps'], device)
        teachers = _teacher_costs(task, parts, optimizer, device)
    return dict(name=spec['variant'], step_s=step_s, peak_mb=round(peak_mb, 1),
                images_per_s=spec['batch'] / step_s, precision=precision,
                params=param_counts(task),
                losses=losses, components=components, teachers=teachers)


def _build_variant(spec: Dict[str, Any], device: torch.device) -> Tuple[Distiller, str, bool, bool]:
    """The variant's distiller with random weights, and its step's precision, channels-last and compile
    switches: those of the run config ``spec['config']``, or the spec's for a named pair."""
    if 'config' in spec:
        cfg = load_config(spec['config'], spec['overrides'])
        if spec['variant'] == 'student':  # method none: no teacher is built
            cfg = dataclasses.replace(cfg, distill=DistillOptions(**ablation('student')))
        configure_backends(cfg.train)
        return (build_task(cfg, device, random_weights=True),
                resolve_precision(cfg.train.precision, device, 'train.precision'), cfg.train.channels_last,
                cfg.train.compile)
    configure_backends(TrainConfig())
    options = {**spec.get('options', {}), **ablation(spec['variant'])}
    precision = resolve_precision(spec['precision'], device, '--precision')
    teacher_dtype = resolve_teacher_dtype(spec.get('teacher_precision'), device, '--teacher-precision')
    task = build_distiller(spec['teacher'], spec['student'], img_size=spec['img_size'], device=device,
                           teacher_dtype=teacher_dtype, **options)
    return task, precision, spec['channels_last'], bool(spec.get('compile'))


def time_interleaved(fns: Dict[str, Callable[[], Any]], rounds: int, device: torch.device,
                 warmup: bool = True) -> Dict[str, float]:
    """Median time of each function, run in turn within every round (after a warm-up round), so
    that a machine whose speed drifts over minutes biases none of them."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for r in range(rounds + warmup):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _component_parts(task, optimizer, images, targets, precision: str,
                     full_step: Callable[[], Any]) -> Dict[str, Callable[[], Any]]:
    """Each part of a full ScaleKD step as a call of its own, beside the full step (``full``), to be timed
    in the same rounds: no hidden work means the parts add up to the step. Every part is the distiller's own piece
    (:meth:`~scalekd.Distiller.teacher_features`, :class:`~scalekd.DistillationModule`'s
    ``student_pass``, ``proxy_views``, ``s4_views`` and ``tap_losses``).

    student: student forward + backward with the task loss; teacher: the no-grad teacher forward (with
    its input re-normalisation); proxy / s4: the projectors (and, for the proxy path, the teacher's last
    stage) forward + backward from the student's s3 / s4 maps, down to their gradients; optimizer: the
    SGD step over every trainable parameter and clearing the gradients (as ``full`` does; every part
    starts without gradients, as in a step).
    """
    device = images.device
    module = unwrap_model(task.trainable_module)
    last_stages = task.last_stages()
    with torch.no_grad(), autocast(precision, device):
        feats = task.teacher_features(images)
        _, s3, s4 = module.student_pass(images)
    s3, s4 = s3.requires_grad_(), s4.requires_grad_()  # the projectors' backward reaches the student, as in a step

    def student():
        with autocast(precision, device):
            logits, _, _ = module.student_pass(images)
            loss = task.criterion(logits, targets)
        loss.backward()

    def optimizer_step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    optimizer.zero_grad(set_to_none=True)
    parts = dict(full=full_step, student=student)
    for name, branch in module.branches.items():
        parts.update(_teacher_parts(task, name, branch, images, feats[name], last_stages.get(name), s3, s4, precision,
                                    module.prefix(name)))
    parts['optimizer'] = optimizer_step
    return parts


def _teacher_costs(task: Distiller, parts: Dict[str, Callable[[], Any]], optimizer: torch.optim.Optimizer,
                   device: torch.device) -> List[Dict[str, Any]]:
    """Each teacher's :func:`~scalekd.task.report.teacher_rows` row (its parameters and its projectors')
    with the peak memory (MiB) its forward (``forward_peak_mb``) and each of its projector parts
    (``proxy_peak_mb``, ``s4_peak_mb``, their gradients included) add, each run alone."""
    module = unwrap_model(task.trainable_module)
    rows = teacher_rows(task)
    for row in rows:
        prefix = module.prefix(row['name'])
        for part, key in (('teacher', 'forward_peak_mb'), ('proxy', 'proxy_peak_mb'), ('s4', 's4_peak_mb')):
            if prefix + part in parts:
                optimizer.zero_grad(set_to_none=True)  # a part allocates its gradients, as in a step
                row[key] = _added_peak_mb(parts[prefix + part], device)
    optimizer.zero_grad(set_to_none=True)
    return rows


def _added_peak_mb(fn: Callable[[], Any], device: torch.device) -> Optional[float]:
    """The peak memory (MiB) a call adds to what the process holds before it (CUDA: allocated memory;
    CPU: the resident set, once the heap's free pages are given back); None where the CPU high-water
    mark cannot be reset."""
    gc.collect()
    if device.type == 'cpu':
        give_back_free_heap()
    if not reset_peak_memory(device):
        return None
    held = peak_memory_mb(device)  # the mark was just reset to what is held now
    fn()
    _sync(device)
    return round(peak_memory_mb(device) - held, 2)


def _teacher_parts(task, name: str, branch, images: torch.Tensor, feats, last_stage, s3: torch.Tensor,
                   s4: torch.Tensor, precision: str, prefix: str) -> Dict[str, Callable[[], Any]]:
    """One teacher's parts, named ``{prefix}teacher``, ``{prefix}proxy`` (with TPP) and ``{prefix}s4``."""
    device = images.device

    def teacher():
        with torch.no_grad(), autocast(precision, device):
            task.teacher_forward(name, images)

    def proxy():
        with autocast(precision, device):
            views = branch.proxy_views(s3, feats, last_stage)
            loss = sum(branch.tap_losses('proxy', views, feats).values())
        loss.backward()
        s3.grad = None
        return views

    proxy_views = {k: v.detach() for k, v in proxy().items()} if branch.proxy is not None else None

    def s4_path():
        with autocast(precision, device):
            loss = sum(branch.tap_losses('s4', branch.s4_views(s4, proxy_views), feats).values())
        loss.backward()
        s4.grad = None

    parts = {f'{prefix}teacher': teacher, f'{prefix}proxy': proxy, f'{prefix}s4': s4_path}
    if branch.proxy is None:  # switched off by --option
        del parts[f'{prefix}proxy']
    return parts


def cpu_name() -> str:
    """This CPU's model name, core count and whether it has bf16 matrix units (the figures depend on them)."""
    try:
        model = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')),
                     'unknown CPU')
    except OSError:
        model = 'unknown CPU'
    units = 'AVX512-BF16 or AMX' if cpu_has_fast_bf16() else 'no AVX512-BF16 / AMX'
    return f'{model} ({torch.get_num_threads()} threads, {units})'


def run_bench(teacher: str, student: str, img_size: int = 224, batch: int = 8, steps: int = 3,
              precision: str = 'fp32', channels_last: bool = False, device: str = 'cpu',
              variants: Optional[Sequence[str]] = None, options: Optional[Dict[str, Any]] = None,
              progress=None, teacher_precision: Optional[str] = None, compile: bool = False,
              compile_backend: str = 'inductor', isolate: bool = True) -> Dict[str, Any]:
    """Measure every variant, each in its own process (``isolate``) or one after the other in this one;
    the JSON-ready result. ``teacher_precision``: the teacher forward's own precision (default:
    ``precision``); ``compile``: as ``train.compile``, with ``compile_backend`` (``eager`` only traces:
    a check of the graphs, not of their speed)."""
    names = _variant_names(variants, list(ABLATIONS))
    spec = dict(teacher=teacher, student=student, img_size=img_size, batch=batch, steps=steps,
                precision=precision, channels_last=channels_last, device=device, parts='scalekd',
                options=options or {}, teacher_precision=teacher_precision, compile=compile,
                compile_backend=compile_backend)
    rows = _measure_variants(names, spec, isolate, progress)
    return _report(rows, spec, isolate, teacher=teacher, student=student, img_size=img_size, precision=precision,
                   teacher_precision=teacher_precision, channels_last=channels_last, compile=compile)


def run_config_bench(config: str, overrides: Optional[Sequence[str]] = None, batch: int = 8, steps: int = 3,
                     device: str = 'cpu', variants: Optional[Sequence[str]] = None, progress=None,
                     img_size: Optional[int] = None, precision: Optional[str] = None,
                     teacher_precision: Optional[str] = None, channels_last: Optional[bool] = None,
                     compile: Optional[bool] = None, compile_backend: str = 'inductor',
                     isolate: bool = True) -> Dict[str, Any]:
    """:func:`run_bench` of a run config (several teachers too), built with random weights: its method
    and the student alone (``variants``: a subset of those two), at the config's ``data.img_size``,
    ``distill`` options and ``train`` precision, teacher precision, channels-last and compile switches,
    each replaced by the argument of that name where it is not None. The method's row adds each part of
    its step and, in ``teachers``, each teacher's parameters and the peak memory its forward and its
    projectors add."""
    settings = {'data.img_size': img_size, 'train.precision': precision, 'train.teacher_precision': teacher_precision,
                'train.channels_last': channels_last, 'train.compile': compile}
    overrides = [*(overrides or []), *(f'{k}={v}' for k, v in settings.items() if v is not None)]
    cfg = load_config(config, overrides)
    method = cfg.distill.method
    names = _variant_names(variants, ['student'] + ([method] if method != 'none' else []))
    spec = dict(config=str(config), overrides=overrides, batch=batch, steps=steps, device=device,
                parts=method if method in FEATURE_METHODS else None, compile_backend=compile_backend)
    rows = _measure_variants(names, spec, isolate, progress)
    return _report(rows, spec, isolate, config=str(config), **_config_header(cfg))


def _config_header(cfg: RunConfig) -> Dict[str, Any]:
    """What a config bench's report says of its models and switches, as :func:`run_bench`'s does."""
    teachers = cfg.teacher_configs()
    return dict(teacher=' + '.join(t.model for t in teachers) or None, student=cfg.student.model,
                img_size=cfg.data.img_size, precision=cfg.train.precision,
                teacher_precision=cfg.train.teacher_precision, channels_last=cfg.train.channels_last,
                compile=cfg.train.compile)


def _variant_names(variants: Optional[Sequence[str]], known: List[str]) -> List[str]:
    names = list(variants or known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f'unknown bench variant(s) {", ".join(unknown)}; choose from {", ".join(known)}')
    return names


def _measure_variants(names: Sequence[str], spec: Dict[str, Any], isolate: bool, progress) -> List[Dict[str, Any]]:
    """Each variant's row: ``spec`` with its name, measured in its own process (``isolate``) or in this one."""
    rows = []
    for name in names:
        if progress:
            progress(f'measuring {name} ...')
        own = dict(spec, variant=name)
        rows.append(_measure_in_child(name, own) if isolate else _measure_here(own))
    return rows


def _report(rows: List[Dict[str, Any]], spec: Dict[str, Any], isolate: bool, **header: Any) -> Dict[str, Any]:
    """The JSON-ready report: ``header``, the run's settings, each variant's row (with its ratios to KD),
    the parts of the step that has them and its teachers' costs."""
    by_name = {r['name']: r for r in rows}
    if 'kd' in by_name:
        for r in rows:
            r['step_x_kd'] = r['step_s'] / by_name['kd']['step_s']
            r['peak_x_kd'] = r['peak_mb'] / by_name['kd']['peak_mb']
    device = spec['device']
    device_name = torch.cuda.get_device_name(torch.device(device)) if device.startswith('cuda') else 'cpu'
    parts_row = by_name.get(spec['parts']) or {}
    return dict(header, batch=spec['batch'], steps=spec['steps'],
                precision=rows[0]['precision'] if rows else header['precision'],
                compile_backend=spec['compile_backend'] if header['compile'] else None, isolated=isolate,
                cpu=cpu_name(), torch=torch.__version__, device=device_name, variants=rows,
                components=_components(parts_row), teachers=parts_row.get('teachers'))


def _measure_in_child(name: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    result = subprocess.run([sys.executable, '-m', 'scalekd.tools.bench', json.dumps(spec)],
                            capture_output=True, text=True)
    _check_child(name, result)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _measure_here(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One variant in this process, whose memory is given back before the next one is built."""
    row = measure_variant(spec)
    gc.collect()  # the compiled pieces hold their modules in reference cycles
    if spec['device'].startswith('cuda'):
        torch.cuda.empty_cache()
    return row


def _check_child(name: str, result: subprocess.CompletedProcess) -> None:
    """A variant's process that stopped on a user error (exit 2): that one line as a :class:`UserError`;
    one that crashed: a RuntimeError with its traceback."""
    if result.returncode == 2:
        raise UserError(f'bench variant {name}: {result.stderr.strip()}')
    if result.returncode != 0:
        raise RuntimeError(f'bench variant {name} failed (exit code {result.returncode}):\n{result.stderr.strip()}')


def _child_main(spec_json: str) -> int:
    """``python -m scalekd.tools.bench SPEC_JSON``: one variant's JSON on stdout; a user error (bad model name,
    option) as one line on stderr and exit 2, as ``scalekd`` reports it."""
    try:
        print(json.dumps(measure_variant(json.loads(spec_json))))
    except UserError as e:
        print(f'{type(e).__name__}: {error_line(e)}', file=sys.stderr)
        return 2
    return 0


def _components(row: Dict[str, Any]) -> Optional[Dict[str, float]]:
    """The isolated parts of the row's full step, their sum, and the share of the step they leave unexplained."""
    if not row.get('components'):
        return None
    parts = dict(row['components'])
    step = parts.pop('full')
    total = sum(parts.values())
    return dict(parts, sum=total, full=step, unexplained=(step - total) / step)


def format_table(report: Dict[str, Any]) -> str:
    """The report shaped like the paper's Table 15(b); for a run config, each teacher's parts and costs too."""
    teacher = f" (teacher {report['teacher_precision']})" if report.get('teacher_precision') else ''
    backend = report.get('compile_backend')
    compiled = ' compiled' + (f' ({backend})' if backend not in (None, 'inductor') else '') if report.get('compile') \
        else ''
    source = f"{report['config']}: " if report.get('config') else ''
    lines = [f"{source}{report['teacher']} -> {report['student']} at {report['img_size']}, batch {report['batch']}, "
             f"{report['precision']}{teacher}{' channels_last' if report['channels_last'] else ''}{compiled} "
             f"on {report['device']}{': ' + report['cpu'] if report['device'] == 'cpu' else ''}",
             f"{'variant':<12} {'step s':>8} {'x KD':>6} {'img/s':>7} {'peak MB':>9} {'x KD':>6} {'distill params':>15}"]
    for r in report['variants']:
        lines.append(f"{r['name']:<12} {r['step_s']:>8.3f} {r.get('step_x_kd', float('nan')):>6.2f} "
                     f"{r['images_per_s']:>7.1f} {r['peak_mb']:>9.0f} {r.get('peak_x_kd', float('nan')):>6.2f} "
                     f"{r['params']['distill']:>15,}")
    by_name = {r['name']: r for r in report['variants']}
    if 'kd' in by_name and 'scalekd' in by_name:
        extra = by_name['scalekd']['peak_mb'] - by_name['kd']['peak_mb']
        state = by_name['scalekd']['params']['distill'] * 12 / 2 ** 20  # fp32 weight + gradient + SGD momentum
        lines.append(f"scalekd peak over kd: +{extra:.0f} MB, of which the projectors' fp32 weights, gradients "
                     f"and momentum take {state:.0f} MB (kd + that alone: "
                     f"{(by_name['kd']['peak_mb'] + state) / by_name['kd']['peak_mb']:.2f} x kd)")
    c = report.get('components')
    label = next((r['name'] for r in report['variants'] if r.get('components')), None)
    if c and 'teacher' in c:  # one teacher: its parts on one line
        names = [n for n in ('student', 'teacher', 'proxy', 's4', 'optimizer') if n in c]
        lines.append(f'{label} step, parts timed alone: ' + ' + '.join(f'{n} {c[n]:.3f}' for n in names)
                     + f" = {c['sum']:.3f} s vs full {c['full']:.3f} s ({100 * c['unexplained']:+.1f}% unexplained); "
                     f"teacher share {100 * c['teacher'] / c['full']:.0f}%")
    elif c:
        lines += _parts_by_teacher(c, [t['name'] for t in report['teachers']], label)
    if report.get('config') and report.get('teachers'):
        lines += _teacher_costs_table(report['teachers'])
    return '\n'.join(lines)


def _parts_by_teacher(c: Dict[str, float], teachers: List[str], label: str) -> List[str]:
    """Several teachers: each part's milliseconds and share of the full step, with a subtotal per teacher."""
    def line(name: str, seconds: float) -> str:
        return f'  {name:<28} {1000 * seconds:>10.1f} {100 * seconds / c["full"]:>6.1f}%'

    lines = [f'{label} step, parts timed alone (ms, share of the full step):', line('student', c['student'])]
    for name in teachers:
        own = [part for part in c if part.startswith(f'{name}/')]
        lines += [line(part, c[part]) for part in own] + [line(f'{name} subtotal', sum(c[part] for part in own))]
    lines += [line('optimizer', c['optimizer']),
              f"  sum {1000 * c['sum']:.1f} ms vs full {1000 * c['full']:.1f} ms "
              f"({100 * c['unexplained']:+.1f}% unexplained)"]
    return lines


def _teacher_costs_table(teachers: List[Dict[str, Any]]) -> List[str]:
    """One line per teacher: model, input size, parameters, and the peak memory its parts add."""
    def mb(value: Optional[float]) -> str:
        return '-' if value is None else f'{value:.1f}'

    name_w = max(len('teacher'), *(len(t['name']) for t in teachers))
    model_w = max(len(t['model']) for t in teachers)
    lines = [f"{'teacher':<{name_w}} {'model':<{model_w}} {'img':>9} {'params':>13} {'distill params':>15} "
             f"{'forward MB':>11} {'proxy MB':>9} {'s4 MB':>7}"]
    for t in teachers:
        size = 'x'.join(map(str, t['img_size']))
        lines.append(f"{t['name']:<{name_w}} {t['model']:<{model_w}} {size:>9} {t['params']:>13,} "
                     f"{t.get('distill_params', 0):>15,} {mb(t.get('forward_peak_mb')):>11} "
                     f"{mb(t.get('proxy_peak_mb')):>9} {mb(t.get('s4_peak_mb')):>7}")
    lines.append('forward / proxy / s4 MB: the peak memory each part adds, run alone, to what the process holds '
                 'between steps (the projectors\' with their gradients)')
    return lines


if __name__ == '__main__':  # one variant, in its own process
    sys.exit(_child_main(sys.argv[1]))
