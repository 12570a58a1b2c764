"""The scale studies of ``scalekd ablate`` (teacher_scale, data_scale) and the demo's teacher registry."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from engine_fixtures import make_fashion_mnist
from scalekd.adapters.models import create_timm_model
from scalekd.cli import main
from scalekd.engine.errors import UserError
from scalekd.engine.inputs.config import config_from_dict, load_config
from scalekd.tools import ablation, demo, scale_studies
from scalekd.tools.ablation import STUDIES, data_scale_study, format_study, run_study
from scalekd.tools.diagnosis import diagnose, main as diagnosis_main
from scalekd.tools.demo import DEMO_TEACHERS, METHOD_LABELS, STUDENTS, DemoSettings, decisive, demo_teacher, run_config
from scalekd.tools.export import export_student
from scalekd.tools.scale_studies import AgainstDefault, DataScale, TeacherScale, row_label
from test_ablation import TERMS, _terms

FIXTURE = Path(__file__).parent / 'fixtures' / 'demo_run_configs.jsonl'  # the run configs before the registry
ADDED_SINCE = ('fd_kd', 'scalekd_ffn_0.25', 'scalekd_small')  # rows of those studies the fixture predates
TERMS = dict(TERMS, **{f'kd_{t}': {'kd_loss'} for t in ('vit_2k', 'vit_6k')},
             **{f'scalekd_{t}': TERMS['scalekd'] for t in ('vit_2k', 'vit_6k')},
             **{f'{r}_n32_e3': TERMS[r] for r in ('student', 'kd', 'fd', 'fd_kd', 'cap_dfm_tpp', 'scalekd')})
TINY_TEACHERS = {'vit_2k': dict(embed_dim=32, depth=4, num_heads=2), 'vit_6k': dict(embed_dim=64, depth=4, num_heads=4)}


def _export_teacher(folder: Path, **kwargs) -> torch.nn.Module:
    """A random ViT teacher of the demo's family, exported as ``scalekd export --dtype float16`` does."""
    torch.manual_seed(0)
    model = create_timm_model('vit_tiny_patch16_224', (28, 28), role='teacher', num_classes=10, in_chans=1,
                              patch_size=7, **kwargs)
    export_student(model, folder, dict(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,), interpolation='bilinear',
                                       crop_pct=1.0), dtype='float16')
    return model


def test_the_runs_of_every_earlier_study_and_demo_keep_their_config():
    """The registry changes no config the demo and the studies ran before (their finished runs are reused)."""
    package = str(Path(demo.__file__).parents[1])
    settings = {'demo': DemoSettings(device=torch.device('cpu')),
                'ablate': DemoSettings(output='runs/ablate', device=torch.device('cpu'))}
    now = {f'{s}-{METHOD_LABELS[m]}': decisive(run_config(settings['demo'], s, m)) for s in STUDENTS for m in METHOD_LABELS}
    now.update({f'{s}/{label}': decisive(ablation._run_config(settings['ablate'], s, label, options, 1))
                for name in ('components', 'pilot', 'views', 'beta', 'projector') for s in STUDIES[name].students
                for label, options, _ in STUDIES[name].rows if label not in ADDED_SINCE})
    before = {}
    for line in FIXTURE.read_text().splitlines():
        run = json.loads(line)
        run['config']['teacher']['checkpoint'] = (run['config']['teacher']['checkpoint'] or '').replace(
            '<package>', package) or None
        before[run['run']] = decisive(config_from_dict(run['config']))  # keys added since at their defaults
    assert len(before) == 45 and now == before


def test_a_demo_teacher_is_built_from_its_config_json(tmp_path, monkeypatch):
    model = _export_teacher(tmp_path / 'small', **TINY_TEACHERS['vit_2k'])
    monkeypatch.setitem(DEMO_TEACHERS, 'vit_2k', dict(DEMO_TEACHERS['vit_2k'], asset=tmp_path / 'small'))
    spec = demo_teacher('vit_2k')
    assert spec == dict(model='vit_tiny_patch16_224', kwargs=dict(patch_size=7, **TINY_TEACHERS['vit_2k']),
                        mean=(0.286,), std=(0.353,), weights=str(tmp_path / 'small' / 'model.safetensors'))
    loaded = demo.load_teacher(teacher='vit_2k')
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(loaded(x), model.half().float().eval()(x), atol=1e-5)  # the fp16 weights, loaded
    assert demo.TEACHER == {k: v for k, v in demo_teacher('vit').items() if k != 'weights'}
    assert demo.TEACHER['kwargs'] == dict(patch_size=7, embed_dim=160, depth=6, num_heads=5)  # configs/demo/teacher_vit.yaml
    monkeypatch.setitem(DEMO_TEACHERS, 'vit_6k', dict(DEMO_TEACHERS['vit_6k'], asset=tmp_path / 'none'))
    with pytest.raises(UserError, match=r"demo teacher 'vit_6k' is not in .*none: train configs/demo/teacher_vit_"
                                        r"6k.yaml with scalekd train, then scalekd export --dtype float16"):
        run_config(DemoSettings(teacher='vit_6k'), 'cnn', 'kd')
    assert run_config(DemoSettings(teacher='vit_6k'), 'cnn', 'none').teacher.model == ''  # the student needs none
    with pytest.raises(UserError, match="unknown demo teacher 'big'; choose from vit, vit_2k, vit_6k, cnn"):
        demo_teacher('big')


def _summary(study, rows, **extra):
    """A summary of ``study`` for one student, seeds 0-2, from row label -> top-1 per seed."""
    settings = dict(subset=800, epochs=15)
    refs = {label: ablation._references(options) for label, options, _ in study.rows}
    table = {}
    for label, top1 in rows.items():
        table[label] = dict(mean=sum(top1) / 3, spread=0.0, top1=top1)
        for ref, ref_label in refs[label].items():
            table[label][f'vs_{ref}'], table[label][f'vs_{ref}_spread'] = ablation.paired(top1, rows[ref_label])
    return dict(study='s', seeds=[0, 1, 2], settings=settings, students={'cnn': dict(model='m', rows=table)}, **extra)


@pytest.mark.parametrize('scalekd, slope, holds', [((1.0, 2.0, 3.0), 0.2, True), ((3.0, 2.0, 1.0), -0.2, False),
                                                   ((1.0, 1.25, 1.5), 0.05, False)])
def test_the_teacher_scale_claim_on_a_hand_made_summary(scalekd, slope, holds):
    """Teachers at 80 / 85 / 90; KD gains 0.5 / 1 / 1.5 (0.1 per point of teacher top-1); ScaleKD's gains
    rise by 0.2 per point (holds), fall (does not), rise by 0.05 per point, less than KD's (does not)."""
    student = [70.0, 71.0, 72.0]
    rows = {'student': student}
    for teacher, kd, skd in zip(('vit_2k', 'vit', 'vit_6k'), (0.5, 1.0, 1.5), scalekd):
        rows[row_label('kd', teacher=teacher)] = [s + kd for s in student]
        rows[row_label('scalekd', teacher=teacher)] = [s + skd for s in student]
    summary = _summary(STUDIES['teacher_scale'], rows, measured={'vit_2k': dict(top1=80.0), 'vit': dict(top1=85.0),
                                                                 'vit_6k': dict(top1=90.0)})
    verdict = TeacherScale(('vit', 'vit_6k', 'vit_2k')).analyse(summary)['cnn']  # in the teachers' order
    assert [p['teacher'] for p in verdict['points']] == ['vit_2k', 'vit', 'vit_6k']
    assert [p['scalekd'] for p in verdict['points']] == pytest.approx(scalekd)
    assert verdict['kd_slope'] == pytest.approx(0.1) and verdict['scalekd_slope'] == pytest.approx(slope)
    assert verdict['holds'] is holds
    summary['analysis'] = {'cnn': verdict}
    assert ('the claim holds' if holds else 'the claim does not hold') in TeacherScale(('vit',)).format(summary)


@pytest.mark.parametrize('small, large, overtakes', [(-2.0, 1.0, True), (-2.0, -1.0, False), (2.0, 1.0, False)])
def test_the_data_scale_criterion_on_a_hand_made_summary(small, large, overtakes):
    """CAP+DFM+TPP - FD of -2 at 800 and +1 at 3000 overtakes; still behind, or a lead that shrank, does not."""
    study = data_scale_study(3000)
    base = [70.0, 71.0, 73.0]
    rows = {}
    for setting, diff in (({}, small), ({'subset': 3000}, large)):
        for r, gain in (('student', 0), ('kd', 1), ('fd', 2), ('fd_kd', 3), ('cap_dfm_tpp', 2 + diff), ('scalekd', 4)):
            rows[row_label(r, **setting)] = [b + gain for b in base]
    verdict = DataScale(3000).analyse(_summary(study, rows))['cnn']
    assert [(a['subset'], a['epochs']) for a in verdict['at']] == [(800, 15), (3000, 15)]
    assert [a['cap_dfm_tpp-fd'] for a in verdict['at']] == [pytest.approx((small, 0.0)), pytest.approx((large, 0.0))]
    assert [a['scalekd-fd_kd'] for a in verdict['at']] == [pytest.approx((1.0, 0.0))] * 2
    assert verdict['overtakes'] == {'cap_dfm_tpp-fd': overtakes, 'scalekd-fd_kd': False}


@pytest.mark.parametrize('args, error', [
    (['data_scale', '--large-subset', '800'], "--large-subset takes a number of training images other than the "
                                              "study's 800, got 800"),
    (['data_scale', '--large-epochs', '0'], '--large-epochs takes a positive number of epochs, got 0'),
    (['components', '--large-subset', '3000'], '--large-subset and --large-epochs set the data_scale study, not components'),
])
def test_ablate_refuses_large_options_it_cannot_use(args, error, capsys, tmp_path):
    assert main(['ablate', *args, '--output', str(tmp_path / 'out')]) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_ablate_data_scale_trains_the_larger_subset_it_is_given(monkeypatch, tmp_path):
    ran = []
    monkeypatch.setattr(ablation, 'run_study', lambda study, settings, *a, **k: ran.append((study, settings)) or {})
    monkeypatch.setattr(ablation, 'format_study', lambda study, summary: '')
    for extra in ([], ['--large-subset', '5000', '--large-epochs', '30'], ['--large-epochs', '15']):
        assert main(['ablate', 'data_scale', '--output', str(tmp_path), *extra]) == 0
    assert [[label for label, _, _ in study.rows][6:] for study, _ in ran] == [
        [f'{r}_n{n}' for r in scale_studies.DATA_ROWS] for n in (3000, '5000_e30', 3000)]  # 15: the same epochs
    assert ran[1][0].rows[-1][1] == dict(subset=5000, epochs=30) and ran[1][1].subset == 800


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """The ablation tests' budget, with tiny random teachers for vit_2k and vit_6k."""
    tmp = tmp_path_factory.mktemp('scale')
    data = make_fashion_mnist(tmp / 'fm', n_train=40, n_test=20)
    with pytest.MonkeyPatch.context() as mp:
        for key, kwargs in TINY_TEACHERS.items():
            _export_teacher(tmp / key, **kwargs)
            mp.setitem(DEMO_TEACHERS, key, dict(DEMO_TEACHERS[key], asset=tmp / key))
        yield DemoSettings(output=str(tmp / 'out'), subset=16, epochs=2, batch_size=8, test_sample=10, data=str(data),
                           progress=False, device=torch.device('cpu'))


@pytest.mark.slow
def test_teacher_scale_trains_each_row_from_its_teacher_and_measures_each_teacher_once(tiny, monkeypatch):
    study = STUDIES['teacher_scale']
    summary = run_study(study, tiny, seeds=(0,), students=('cnn',), say=lambda line: None)
    out = Path(tiny.output)
    rows = summary['students']['cnn']['rows']
    assert list(rows) == ['student', 'kd_vit_2k', 'scalekd_vit_2k', 'kd_vit_6k', 'scalekd_vit_6k', 'kd', 'scalekd']
    for label in rows:
        folder = out / 'runs' / 'cnn' / label / 'seed0'
        assert _terms(folder) == TERMS[label], label
        teacher = load_config(folder / 'config.yaml').teacher
        key = label.split('_', 1)[1] if '_' in label else 'vit'
        if label == 'student':
            assert teacher.model == ''
        else:
            assert teacher.checkpoint == str(DEMO_TEACHERS[key]['asset'] / 'model.safetensors'), label
            assert teacher.kwargs == demo_teacher(key)['kwargs']
        assert rows[label]['vs_kd'] == pytest.approx(rows[label]['mean'] - rows[row_label(
            'kd', teacher=key)]['mean'])  # paired with KD from the same teacher
    measured = json.loads((out / 'teachers.json').read_text())
    assert list(measured) == ['vit_2k', 'vit_6k', 'vit'] and summary['measured'] == measured
    settings = dataclasses.replace(tiny, teacher='vit_6k')
    test = demo.test_loader(run_config(settings, 'cnn', 'none'))
    assert measured['vit_6k']['top1'] == pytest.approx(
        demo.teacher_top1(settings, test, demo.DistEnv(device=torch.device('cpu'))))
    verdict = summary['analysis']['cnn']
    assert sorted(p['teacher_top1'] for p in verdict['points']) == [p['teacher_top1'] for p in verdict['points']]
    assert set(verdict) == {'points', 'kd_slope', 'scalekd_slope', 'holds'}
    table = (out / 'teacher_scale.md').read_text()
    assert table == format_study(study, summary) + '\n'
    assert f'| vit_6k | {measured["vit_6k"]["top1"]:.2f} |' in table and 'the claim' in table
    for name in ('teacher_scale.png', 'teacher_scale_gain.png'):
        assert (out / name).read_bytes()[:4] == b'\x89PNG'
    calls = []
    monkeypatch.setattr(scale_studies, 'teacher_top1', lambda *a: calls.append(a) or 0.0)
    said = []
    again = run_study(study, tiny, seeds=(0,), students=('cnn',), say=said.append)
    assert calls == [] and said == [] and again['measured'] == measured  # nothing measured or trained again


@pytest.mark.slow
def test_data_scale_trains_its_rows_at_each_subset_and_shares_the_components_runs(tiny, tmp_path):
    settings = dataclasses.replace(tiny, output=str(tmp_path / 'out'))
    run_study(STUDIES['components'], settings, seeds=(0,), students=('cnn',), say=lambda line: None)
    study = data_scale_study(32, 3)
    said = []
    summary = run_study(study, settings, seeds=(0,), students=('cnn',), say=said.append)
    assert sorted(line.split(': ')[1] for line in said) == sorted(f'cnn {r}_n32_e3 seed 0' for r in scale_studies.DATA_ROWS)
    rows = summary['students']['cnn']['rows']
    for label in rows:
        folder = tmp_path / 'out' / 'runs' / 'cnn' / label / 'seed0'
        assert _terms(folder) == TERMS[label], label
        cfg = load_config(folder / 'config.yaml')
        large = label.endswith('_n32_e3')
        assert (cfg.data.train_subset, cfg.sched.epochs) == ((32, 3) if large else (16, 2)), label
        assert rows[label]['vs_student'] == pytest.approx(rows[label]['mean'] - rows[
            'student_n32_e3' if large else 'student']['mean'])
    assert load_config(tmp_path / 'out' / 'runs' / 'cnn' / 'fd_kd' / 'seed0' / 'config.yaml').distill_options() \
        .resolve().switches() == dict(method='fd', projector='linear', stages=('s4',), views='single', tpp=False,
                                      adaptive_queries=False, kd=True)
    verdict = summary['analysis']['cnn']
    assert [(a['subset'], a['epochs']) for a in verdict['at']] == [(16, 2), (32, 3)]
    assert verdict['at'][1]['cap_dfm_tpp-fd'][0] == pytest.approx(rows['cap_dfm_tpp_n32_e3']['mean'] - rows['fd_n32_e3']['mean'])
    table = (tmp_path / 'out' / 'data_scale.md').read_text()
    assert table == format_study(study, summary) + '\n' and 'Does CAP overtake FD as data grows?' in table
    assert not (tmp_path / 'out' / 'data_scale_gain.png').exists()


@pytest.mark.slow
def test_the_teachers_study_trains_from_each_teacher_and_from_both(tiny, tmp_path, monkeypatch):
    """The ``teachers`` study: KD and ScaleKD from the ViT, from the CNN teacher and from both at once; the
    two-teacher rows log each teacher's terms under its name, their configs list both teachers, and the
    analysis pairs the two-teacher row with each one-teacher row."""
    torch.manual_seed(0)
    cnn = create_timm_model('resnet18', (28, 28), role='teacher', num_classes=10, in_chans=1,
                            channels=[8, 16, 32, 64], stem_width=8, output_stride=16)
    export_student(cnn, tmp_path / 'cnn', dict(input_size=(1, 28, 28), mean=(0.286,), std=(0.353,),
                                              interpolation='bilinear', crop_pct=1.0), dtype='float16')
    monkeypatch.setitem(DEMO_TEACHERS, 'cnn', dict(DEMO_TEACHERS['cnn'], asset=tmp_path / 'cnn'))
    study = STUDIES['teachers']
    summary = run_study(study, tiny, seeds=(0,), students=('cnn',), say=lambda line: None)
    rows = summary['students']['cnn']['rows']
    assert list(rows) == ['student', 'kd', 'scalekd', 'kd_cnn', 'scalekd_cnn', 'kd_vit+cnn', 'scalekd_vit+cnn']
    runs = Path(tiny.output) / 'runs' / 'cnn'
    both = {f'{t}/{term}' for t in ('vit', 'cnn') for term in ('proxy_ori', 'proxy_alt', 's4_ori', 's4_alt')}
    assert _terms(runs / 'scalekd_vit+cnn' / 'seed0') == both | {'kd_loss'}
    assert _terms(runs / 'kd_vit+cnn' / 'seed0') == {'kd_loss'}
    assert _terms(runs / 'scalekd_cnn' / 'seed0') == TERMS['scalekd']
    cfg = load_config(runs / 'scalekd_vit+cnn' / 'seed0' / 'config.yaml')
    assert cfg.teacher.model == '' and [(t.name, t.model, t.checkpoint) for t in cfg.teachers] == [
        ('vit', 'vit_tiny_patch16_224', str(DEMO_TEACHERS['vit']['asset'] / 'model.safetensors')),
        ('cnn', 'resnet18', str(tmp_path / 'cnn' / 'model.safetensors'))]
    analysis = summary['analysis']['cnn']
    for method in ('kd', 'scalekd'):
        for teacher in ('vit', 'cnn'):
            one = rows[method if teacher == 'vit' else f'{method}_{teacher}']['top1'][0]
            assert analysis[method][teacher]['mean'] == pytest.approx(rows[f'{method}_vit+cnn']['top1'][0] - one)
    assert rows['scalekd_vit+cnn']['vs_kd'] == pytest.approx(rows['scalekd_vit+cnn']['mean'] - rows['kd_vit+cnn']['mean'])
    table = (Path(tiny.output) / 'teachers.md').read_text()
    assert '| cnn | scalekd |' in table and 'both - cnn' in table


@pytest.mark.slow
def test_the_curves_study_logs_every_term_on_the_test_sample_each_epoch_for_the_diagnosis(tiny, tmp_path):
    settings = dataclasses.replace(tiny, output=str(tmp_path / 'out'))
    summary = run_study(STUDIES['curves'], settings, seeds=(0,), students=('vit',), say=lambda line: None)
    rows = summary['students']['vit']['rows']
    assert list(rows) == ['student_curves', 'kd_curves', 'fd_curves', 'cap_dfm_tpp_curves']
    for label in rows:
        base = label[:-len('_curves')]
        folder = tmp_path / 'out' / 'runs' / 'vit' / label / 'seed0'
        assert _terms(folder) == TERMS[base], label
        cfg = load_config(folder / 'config.yaml')
        assert cfg.train.eval_terms and cfg.train.eval_every == 1
        epochs = [json.loads(line) for line in (folder / 'metrics.jsonl').read_text().splitlines()
                  if 'train_task_loss' in line]
        assert len(epochs) == 2 and all({'val_top1', 'val_task_loss', *(f'val_{t}' for t in TERMS[base])} <= set(e)
                                        for e in epochs), label
        assert rows[label]['vs_student'] == pytest.approx(rows[label]['mean'] - rows['student_curves']['mean'])
    result = diagnose(tmp_path / 'out', ['vit'], ['fd_curves', 'cap_dfm_tpp_curves'])
    cap = result['vit']['cap_dfm_tpp_curves']
    assert set(cap['test_terms']) == {'proxy_ori', 'proxy_alt', 's4_ori', 's4_alt'}
    assert [e for e, _ in cap['curves']['s4_ori']['test']] == [1, 2]
    assert (diagnosis_main(['--output', str(tmp_path / 'out'), '--students', 'vit', '--rows',
                            'fd_curves,cap_dfm_tpp_curves', '--plot', str(tmp_path / 'c.png')]) == 0)
    assert (tmp_path / 'c.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.parametrize('vit, ahead', [(0.5, True), (0.05, False), (-0.5, False)])
def test_a_setting_changes_the_default_only_ahead_on_every_seed_of_every_student(vit, ahead):
    """Paired differences to the default row per student, by hand; the ViT's +0.05 mean has a seed behind
    (-0.05): no."""
    base = [70.0, 71.0, 73.0]
    students = {}
    for student, diff in (('cnn', 1.0), ('mlp', 0.25), ('vit', vit)):
        rows = {'scalekd': base, 'scalekd_plr_0.25': [b + diff + d for b, d in zip(base, (-0.1, 0.0, 0.1))]}
        students[student] = dict(model='m', rows={k: dict(top1=v) for k, v in rows.items()})
    analysis = AgainstDefault('scalekd')  # (the rows after it: scalekd_plr_0.25)
    summary = dict(students=students)
    summary['analysis'] = verdict = analysis.analyse(summary)
    assert verdict['diffs']['mlp']['scalekd_plr_0.25'] == pytest.approx((0.25, 0.1))
    assert verdict['diffs']['vit']['scalekd_plr_0.25'][0] == pytest.approx(vit)
    assert verdict['ahead'] == {'scalekd_plr_0.25': ahead}
    assert f'| scalekd_plr_0.25 | +1.00 +- 0.10 | +0.25 +- 0.10 | {vit:+.2f} +- 0.10 | {"yes" if ahead else "no"} |' \
        in analysis.format(summary)
