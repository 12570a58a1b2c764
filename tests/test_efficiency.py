"""The faithful path without waste: equal math, one batched teacher-stage call, cheaper options, the bench."""
import json

import pytest
import torch

from scalekd import CrossAttentionProjector, Dct2d, build_distiller, feature_distance, remove_dc_by_dct
from scalekd.tools.bench import format_table
from scalekd.cli import main
from scalekd.method.mimicking import FeatureMimicking
from scalekd.method.proxy import ProxyPath
from scalekd.method.views import View, build_views
from test_projectors import _reference_cap
from tiny_models import IMG, make_student, make_teacher


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _loss_and_grads(distiller, x, y):
    distiller.zero_grad(set_to_none=True)
    out = distiller(x, y)
    out['loss'].backward()
    return {k: v.detach() for k, v in out.items()}, _grads(distiller.trainable_module)


def _assert_same(a, b, atol=1e-5):
    (la, ga), (lb, gb) = a, b
    for k in la:
        torch.testing.assert_close(la[k], lb[k], atol=atol, rtol=1e-5)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=atol, rtol=1e-4)


@pytest.fixture
def pair():
    torch.manual_seed(0)
    distiller = build_distiller(make_teacher('deit', IMG), make_student('resnet', IMG), img_size=IMG).eval()
    distiller.trainable_module.train()  # deterministic teacher, training student (BN batch stats)
    return distiller, torch.randn(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 3])


@pytest.mark.slow
def test_batched_and_unbatched_tpp_give_equal_losses_and_gradients(pair, monkeypatch):
    distiller, x, y = pair
    calls = []
    stage = distiller.teacher.last_stage
    monkeypatch.setattr(distiller.teacher, 'last_stage', lambda m, p: calls.append(m.shape[0]) or stage(m, p))
    batched = _loss_and_grads(distiller, x, y)
    assert calls == [8]  # both views of 4 images in one call

    def unbatched(self, s3, last_stage, prefix=None):
        projected = self.mimicking.project(s3)
        return {name: last_stage(m, prefix) for name, m in projected.items()}
    monkeypatch.setattr(ProxyPath, 'forward', unbatched)
    calls.clear()
    _assert_same(batched, _loss_and_grads(distiller, x, y))
    assert calls == [4, 4]


def test_sdpa_and_explicit_attention_give_equal_gradients():
    torch.manual_seed(1)
    cap = CrossAttentionProjector(12, 16, (5, 3), (2, 4), num_heads=4).double().eval()
    x = torch.randn(3, 12, 5, 3, dtype=torch.float64)
    target = torch.randn(3, 16, 2, 4, dtype=torch.float64)
    grads = []
    for forward in (cap, lambda t: _reference_cap(cap, t)):
        cap.zero_grad()
        feature_distance(forward(x), target).backward()
        grads.append(_grads(cap))
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-10, rtol=0)


def test_mean_subtraction_and_dct_phi_give_equal_losses_and_gradients():
    torch.manual_seed(2)
    make = lambda: torch.nn.Conv2d(4, 6, 1).double()  # noqa: E731
    mean_form = FeatureMimicking(build_views('dfm'), make)
    dct_form = FeatureMimicking([View('ori', 'all'), View('alt', 'all')], make)
    dct_form.load_state_dict(mean_form.state_dict())
    x, t = torch.randn(2, 4, 5, 7, dtype=torch.float64), torch.randn(2, 6, 5, 7, dtype=torch.float64)
    dct = Dct2d(5, 7, dtype=torch.float64)
    a = mean_form.losses(mean_form.project(x), t, 's4')
    pb = dct_form.project(x)
    b = dict(s4_ori=feature_distance(pb['ori'], t),
             s4_alt=feature_distance(remove_dc_by_dct(pb['alt'], dct), remove_dc_by_dct(t, dct)))
    sum(a.values()).backward()
    sum(b.values()).backward()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-10, rtol=0)
    ga, gb = _grads(mean_form), _grads(dct_form)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-10, rtol=0)


@pytest.mark.slow
def test_activation_checkpointing_changes_nothing_but_memory():
    x, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 3])
    teacher = make_teacher('vit', IMG)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        distiller = build_distiller(teacher, make_student('convnext', IMG), img_size=IMG,
                                    activation_checkpointing=ckpt)
        results.append(_loss_and_grads(distiller, x, y))
    _assert_same(*results)


def test_separable_cap_is_much_smaller():
    full = CrossAttentionProjector(256, 64, (7, 7), (7, 7), num_heads=8)
    cheap = CrossAttentionProjector(256, 64, (7, 7), (7, 7), num_heads=8, student_conv='separable')
    conv = lambda m: sum(p.numel() for p in m.student_conv.parameters())  # noqa: E731
    assert conv(full) > 8 * conv(cheap)
    assert cheap(torch.randn(2, 256, 7, 7)).shape == (2, 64, 7, 7)
    distiller = build_distiller(make_teacher('vit', IMG), make_student('resnet', IMG), img_size=IMG,
                                cap_conv='separable')
    assert torch.isfinite(distiller(torch.randn(2, 3, IMG, IMG), torch.tensor([0, 1]))['loss'])


@pytest.mark.slow
def test_bench_reports_each_variant_in_its_own_process(capsys):
    args = ['bench', '--teacher', 'vit_tiny_patch16_224', '--student', 'resnet18', '--img-size', '32',
            '--batch', '4', '--steps', '2', '--variants', 'student,kd,scalekd', '--json', '--device', 'cpu']
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r['name']: r for r in report['variants']}
    assert list(rows) == ['student', 'kd', 'scalekd']
    assert all(r['step_s'] > 0 and r['peak_mb'] > 100 for r in rows.values())
    assert 'kd_loss' in rows['kd']['losses'] and not {'proxy_ori', 's4_ori', 'kd_loss'} & set(rows['student']['losses'])
    assert rows['student']['params']['distill'] == 0 < rows['scalekd']['params']['distill']
    assert {'proxy_ori', 's4_alt', 'kd_loss'} <= set(rows['scalekd']['losses'])
    parts = report['components']
    assert set(parts) == {'student', 'teacher', 'proxy', 's4', 'optimizer', 'sum', 'full', 'unexplained'}
    assert all(parts[k] > 0 for k in ('student', 'teacher', 'proxy', 's4', 'optimizer', 'full'))
    state_mb = rows['scalekd']['params']['distill'] * 12 / 2 ** 20
    assert f"take {state_mb:.0f} MB" in format_table(report)


def test_unfold_conv_equals_the_direct_convolution():
    """CAP's 3x3 convolution as unfold + matmul: same outputs and gradients as nn.Conv2d (CPU, fp32)."""
    from scalekd.task.kernels import UnfoldConv2d
    torch.manual_seed(0)
    for kwargs, shape in ((dict(padding=1), (2, 16, 7, 7)), (dict(padding=2, stride=2, dilation=2), (2, 16, 9, 6))):
        ref = torch.nn.Conv2d(16, 12, 3, **kwargs)
        fast = UnfoldConv2d(16, 12, 3, **kwargs)
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(*shape, requires_grad=True)
        y_ref, y = ref(x), fast(x)
        assert y.shape == y_ref.shape
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y)
        grads_ref = torch.autograd.grad(y_ref, (x, ref.weight, ref.bias), g)
        grads = torch.autograd.grad(y, (x, fast.weight, fast.bias), g)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unfold_conv_takes_the_direct_kernel_above_its_unfold_bound():
    """The unfolded input of (2, 16, 7, 7) under a 3x3 kernel is 16 x 9 x 2 x 49 floats = 56,448 bytes:
    under a bound of that size the unfold GEMM runs, above it oneDNN's convolution (its autograd node
    says which); the outputs agree."""
    from scalekd.task.kernels import UnfoldConv2d
    torch.manual_seed(0)
    conv = UnfoldConv2d(16, 12, 3, padding=1)
    x = torch.randn(2, 16, 7, 7, requires_grad=True)
    outputs = {}
    for bound in (56_448, 56_447):
        conv.max_unfold_bytes = bound
        outputs[bound] = conv(x)
    assert 'Convolution' not in type(outputs[56_448].grad_fn).__name__
    assert 'Convolution' in type(outputs[56_447].grad_fn).__name__
    torch.testing.assert_close(outputs[56_448], outputs[56_447], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bench_parts_skip_the_paths_an_option_switches_off(capsys):
    args = ['bench', '--teacher', 'vit_tiny_patch16_224', '--student', 'resnet18', '--img-size', '32',
            '--batch', '2', '--steps', '1', '--variants', 'scalekd', '--option', 'tpp=false', '--option', 'adaptive_queries=false', '--json']
    assert main(args) == 0
    parts = json.loads(capsys.readouterr().out)['components']
    assert set(parts) == {'student', 'teacher', 's4', 'optimizer', 'sum', 'full', 'unexplained'}
    assert parts['s4'] > 0


def test_bench_report_ratios_and_parts_from_known_child_results(monkeypatch, capsys):
    """run_bench's arithmetic on canned child results (hand-computed): ratios to KD, the parts' sum and
    the unexplained share, and the table printing them."""
    import subprocess
    from scalekd.tools import bench
    children = {
        'kd': dict(step_s=2.0, peak_mb=1000.0, components=None),
        'scalekd': dict(step_s=5.0, peak_mb=1800.0, components=dict(
            full=4.0, student=1.0, teacher=0.5, proxy=1.25, s4=0.75, optimizer=0.1)),
    }

    def fake_run(cmd, **kwargs):
        spec = json.loads(cmd[-1])
        row = dict(children[spec['variant']], name=spec['variant'], images_per_s=spec['batch'] / 2,
                   precision='fp32', params=dict(distill=2 ** 20 if spec['variant'] == 'scalekd' else 0), losses={})
        return subprocess.CompletedProcess(cmd, 0, stdout='noise\n' + json.dumps(row) + '\n', stderr='')
    monkeypatch.setattr(bench.subprocess, 'run', fake_run)
    report = bench.run_bench('t', 's', variants=['kd', 'scalekd'])
    rows = {r['name']: r for r in report['variants']}
    assert rows['scalekd']['step_x_kd'] == pytest.approx(2.5) and rows['scalekd']['peak_x_kd'] == pytest.approx(1.8)
    assert rows['kd']['step_x_kd'] == pytest.approx(1.0) and rows['kd']['peak_x_kd'] == pytest.approx(1.0)
    parts = report['components']
    assert parts['sum'] == pytest.approx(3.6) and parts['full'] == pytest.approx(4.0)
    assert parts['unexplained'] == pytest.approx(0.1)  # (4.0 - 3.6) / 4.0
    table = format_table(report)
    assert 'scalekd peak over kd: +800 MB' in table and 'take 12 MB' in table  # 2^20 params x 12 bytes
    assert '= 3.600 s vs full 4.000 s (+10.0% unexplained); teacher share 12%' in table  # 0.5 / 4.0
    assert 'teacher bf16' not in table
    assert 'fp32 (teacher bf16) on' in format_table(bench.run_bench('t', 's', variants=['kd'], teacher_precision='bf16'))
    assert [line.split()[:3] for line in table.splitlines()[2:4]] == [['kd', '2.000', '1.00'], ['scalekd', '5.000', '2.50']]
