"""The documentation: its generated references cover every config key and CLI option, and the site
builds with ``mkdocs build --strict`` (a broken link, a missing page or an undocumented key fails)."""
import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _reference():
    spec = importlib.util.spec_from_file_location('docs_reference', ROOT / 'docs' / '_hooks' / 'reference.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _reference()


def test_every_config_key_has_a_description():
    assert reference.config_key_faults() == []


def test_every_cli_option_has_a_description():
    assert reference.cli_option_faults() == []


def test_the_config_reference_lists_every_key_with_type_default_and_rule():
    from scalekd.engine.inputs.config import RunConfig, TeacherConfig, config_to_dict
    keys = {k.key: k for rows in reference.config_keys().values() for k in rows}
    defaults = config_to_dict(RunConfig())
    expected = {section for section, value in defaults.items() if not isinstance(value, dict)}
    expected |= {f'{section}.{key}' for section, value in defaults.items() if isinstance(value, dict) for key in value}
    expected = (expected - {'teachers'}) | {f'teachers[].{f.name}' for f in dataclasses.fields(TeacherConfig)}
    assert set(keys) == expected
    assert keys['teachers[].name'].description.startswith('its name in loss terms')
    assert keys['teachers[].checkpoint'].description.startswith('weights to start from')  # ModelConfig's, inherited
    assert keys['train.precision'].default == 'fp32' and 'auto' in keys['train.precision'].allowed
    assert keys['data.scale'].type == '[float, float]' and keys['data.scale'].default == '[0.08, 1.0]'
    assert keys['distill.s3_heads'].type == 'int' and keys['distill.s3_heads'].default == '8'
    page = reference.config_page()
    assert all(f'`{key}`' in page for key in keys)


def test_a_key_without_a_description_and_a_description_of_no_key_are_named():
    @dataclasses.dataclass
    class LogConfig:
        """A section.

        Attributes:
            documented: what it is, over
                two lines.
            gone: a key that was removed.
        """
        documented: int = 1
        bare: int = 2

    @dataclasses.dataclass
    class RunConfig:
        """A run.

        Attributes:
            seed: the seed.
        """
        seed: int = 0
        log: LogConfig = dataclasses.field(default_factory=LogConfig)
    assert reference.attribute_docs(LogConfig) == {'documented': 'what it is, over two lines.',
                                                   'gone': 'a key that was removed.'}
    assert reference.config_key_faults(RunConfig) == [
        'log.bare: no description', 'log: no description', 'log.gone: described in LogConfig but not a key']


def test_an_option_without_help_is_named(monkeypatch):
    import scalekd.cli

    def parser():
        p = argparse.ArgumentParser(prog='scalekd')
        p.add_argument('--loud', action='store_true')
        sub = p.add_subparsers(dest='command')
        cmd = sub.add_parser('run', help='runs')
        cmd.add_argument('--said', help='has help')
        cmd.add_argument('--silent')
        sub.add_parser('quiet')
        return p
    monkeypatch.setattr(scalekd.cli, 'build_parser', parser)
    assert reference.cli_option_faults() == ['scalekd --loud: no help', 'run --silent: no help', 'quiet: no help']


def test_the_cli_reference_lists_every_option():
    from scalekd.cli import build_parser
    page, parser = reference.cli_page(), build_parser()
    assert all(f'`{a.option_strings[-1]}`' in page for a in reference._options(parser))  # scalekd --traceback ...
    for name, (_, sub) in reference._subcommands(parser).items():
        for action in reference._options(sub):
            assert f'`{action.option_strings[0] if action.option_strings else action.dest}`' in page, (name, action)


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / 'site'
    run = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '-d', str(site)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, 'NO_MKDOCS_2_WARNING': '1'})
    assert run.returncode == 0, run.stderr[-3000:]
    config = (site / 'reference' / 'config' / 'index.html').read_text()
    assert 'train.precision' in config and 'distill.s3_heads' in config
    assert '--resume' in (site / 'reference' / 'cli' / 'index.html').read_text()
    assert 'build_distiller' in (site / 'reference' / 'api' / 'index.html').read_text()
