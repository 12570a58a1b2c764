"""The package's layers import in one direction: method <- adapters <- task <- engine <- tools <- cli.

Each module's imports are read with ``ast``: ``import`` statements anywhere (inside functions too) and
imports made at run time by ``importlib.import_module`` / ``__import__`` with a constant name, relative
ones resolved, so a lazy import that crosses a layer is caught too.
"""
import ast
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'src' / 'scalekd'
LAYERS = ('method', 'adapters', 'task', 'engine', 'tools', 'cli')
THIRD_PARTY = {  # what each layer may import from outside the standard library and the package
    'method': {'torch', 'timm'},
    'adapters': {'torch', 'timm'},
    'task': {'torch', 'timm'},
}


def layer_of(module: str) -> str:
    """``scalekd.engine.loop.trainer`` -> ``engine``; the package root (``scalekd``) sits above every layer."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else 'cli'


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _resolve(name: str, level: int, package: List[str]) -> str:
    """``name`` imported ``level`` packages up from ``package`` (level 0: ``name`` is absolute)."""
    if not level:
        return name
    return '.'.join(package[:len(package) - level + 1] + ([name] if name else []))


def _from_import(base: str, names: Sequence[str], root: Path) -> Iterator[str]:
    """``from base import names``: a name that is a module counts as imported itself."""
    folder = root.parent / base.replace('.', '/')
    for name in names:
        yield f'{base}.{name}' if (folder / name).is_dir() or (folder / f'{name}.py').exists() else base


def _constant(node: Optional[ast.expr]):
    return node.value if isinstance(node, ast.Constant) else None


def _run_time_import(call: ast.Call, package: List[str], root: Path) -> Iterator[str]:
    """What ``importlib.import_module(name, package)`` or ``__import__(name, globals, locals, fromlist,
    level)`` imports, when ``name`` is a constant string (a relative ``import_module`` without a constant
    ``package`` is taken relative to the calling module's package, as ``__package__`` gives)."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', None)
    args = dict(enumerate(call.args), **{k.arg: k.value for k in call.keywords if k.arg})
    name = _constant(args.get(0, args.get('name')))
    if called not in ('import_module', '__import__') or not isinstance(name, str):
        return
    if called == 'import_module':
        anchor = _constant(args.get(1, args.get('package')))
        level = len(name) - len(name.lstrip('.'))
        yield _resolve(name[level:], level, anchor.split('.') if isinstance(anchor, str) else package)
        return
    base = _resolve(name, _constant(args.get(4, args.get('level'))) or 0, package)
    fromlist = args.get(3, args.get('fromlist'))
    names = [_constant(e) for e in fromlist.elts] if isinstance(fromlist, (ast.List, ast.Tuple)) else []
    yield from _from_import(base, [n for n in names if isinstance(n, str)], root) if names else [base]


def imports_in(source: str, name: str, root: Path, is_package: bool = False) -> Iterator[str]:
    """Absolute names of every module the source of module ``name`` imports, relative imports resolved."""
    package = name.split('.') if is_package else name.split('.')[:-1]
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield from _from_import(_resolve(node.module or '', node.level, package),
                                    [alias.name for alias in node.names], root)
        elif isinstance(node, ast.Call):
            yield from _run_time_import(node, package, root)


def imports_of(path: Path, root: Path) -> Iterator[str]:
    """Absolute names of every module ``path`` imports."""
    return imports_in(path.read_text(), module_name(path, root), root, path.name == '__init__.py')


def violations(root: Path = PACKAGE):
    found = []
    for path in sorted(root.rglob('*.py')):
        name = module_name(path, root)
        if name == 'scalekd':
            continue  # the public API re-exports every layer
        rank = LAYERS.index(layer_of(name))
        for imported in imports_of(path, root):
            top = imported.split('.')[0]
            if top == 'scalekd':
                if imported != 'scalekd' and LAYERS.index(layer_of(imported)) > rank:
                    found.append(f'{name} ({layer_of(name)}) imports {imported} ({layer_of(imported)})')
            elif layer_of(name) in THIRD_PARTY and top not in sys.stdlib_module_names \
                    and top not in THIRD_PARTY[layer_of(name)]:
                found.append(f'{name} ({layer_of(name)}) imports third-party {imported}')
    return found


def test_every_module_sits_in_a_layer():
    top_level = sorted(p.stem for p in PACKAGE.glob('*.py') if p.stem != '__init__')
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / '__init__.py').exists())
    assert top_level == ['cli']
    assert folders == sorted(LAYERS[:-1])


def test_imports_point_inward():
    assert violations() == []


def test_a_method_module_importing_the_engine_is_caught(tmp_path):
    copy = tmp_path / 'scalekd'
    for path in PACKAGE.rglob('*.py'):
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    bad = copy / 'method' / 'views.py'
    bad.write_text(bad.read_text() + '\n\ndef late():\n    from ..engine.run_folder import checkpoint\n    return checkpoint\n')
    (copy / 'method' / 'dct.py').write_text((copy / 'method' / 'dct.py').read_text() + '\nimport numpy\n')
    losses = copy / 'method' / 'losses.py'
    losses.write_text(losses.read_text() + "\n\ndef late():\n    return importlib.import_module('..tools.bench', __package__)\n")
    assert sorted(set(violations(copy)) - set(violations())) == ['scalekd.method.dct (method) imports third-party numpy',
                     'scalekd.method.losses (method) imports scalekd.tools.bench (tools)',
                     'scalekd.method.views (method) imports scalekd.engine.run_folder.checkpoint (engine)']


def test_imports_made_at_run_time_with_a_constant_name_are_read():
    source = """
import importlib
from importlib import import_module


def late(name):
    importlib.import_module('scalekd.tools.bench')
    import_module('..engine.checkpoint', __package__)
    import_module('.run_folder', package='scalekd.engine')
    __import__('scalekd.cli')
    __import__('task', globals(), None, ('distiller',), 2)
    return importlib.import_module(name), getattr(name, 'import_module')  # no constant name: not read
"""
    assert list(imports_in(source, 'scalekd.method.views', PACKAGE)) == [
        'importlib', 'importlib', 'scalekd.tools.bench', 'scalekd.engine.checkpoint', 'scalekd.engine.run_folder',
        'scalekd.cli', 'scalekd.task.distiller']


@pytest.mark.parametrize('name', ['build_distiller', 'Distiller', 'DistillOptions', 'CrossAttentionProjector',
                                  'ScaleKDTeacher', 'StudentAdapter', 'create_timm_model', 'remove_dc'])
def test_public_api_stays_at_the_package_root(name):
    import scalekd
    assert name in scalekd.__all__ and getattr(scalekd, name) is not None


def test_the_layout_page_names_every_engine_module_in_its_sub_package():
    page = (PACKAGE.parents[1] / 'docs' / 'architecture.md').read_text()
    rows = {line.split('|')[1].strip(' `'): line.split('|')[2] for line in page.splitlines()
            if line.startswith('| `engine/') and line.count('|') >= 4}
    for folder in sorted(p for p in (PACKAGE / 'engine').iterdir() if (p / '__init__.py').exists()):
        named = rows.get(f'engine/{folder.name}/', '')
        modules = sorted(p.stem for p in folder.glob('*.py') if p.stem != '__init__')
        assert [m for m in modules if f'`{m}`' not in named] == [], folder.name
