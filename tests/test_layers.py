"""The package's layers import in one direction: method <- adapters <- task <- engine <- tools <- cli.

Each module's imports are read with ``ast`` (including imports inside functions), so a lazy import
that crosses a layer is caught too.
"""
import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'src' / 'scalekd'
LAYERS = ('method', 'adapters', 'task', 'engine', 'tools', 'cli')
THIRD_PARTY = {  # what each layer may import from outside the standard library and the package
    'method': {'torch', 'timm'},
    'adapters': {'torch', 'timm'},
    'task': {'torch', 'timm'},
}


def layer_of(module: str) -> str:
    """``scalekd.engine.trainer`` -> ``engine``; the package root (``scalekd``) sits above every layer."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else 'cli'


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports_of(path: Path, root: Path):
    """Absolute names of every module ``path`` imports, relative imports resolved."""
    name = module_name(path, root)
    package = name.split('.') if path.name == '__init__.py' else name.split('.')[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                base = '.'.join(package[:len(package) - node.level + 1] + ([base] if base else []))
            # `from .layer import module` names a module: count it as imported
            folder = root.parent / base.replace('.', '/')
            yield from (f'{base}.{alias.name}' if (folder / alias.name).is_dir() or (folder / f'{alias.name}.py').exists()
                        else base for alias in node.names)


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
    bad.write_text(bad.read_text() + '\n\ndef late():\n    from ..engine import checkpoint\n    return checkpoint\n')
    (copy / 'method' / 'dct.py').write_text((copy / 'method' / 'dct.py').read_text() + '\nimport numpy\n')
    assert sorted(set(violations(copy)) - set(violations())) == ['scalekd.method.dct (method) imports third-party numpy',
                     'scalekd.method.views (method) imports scalekd.engine.checkpoint (engine)']


@pytest.mark.parametrize('name', ['build_distiller', 'Distiller', 'DistillOptions', 'CrossAttentionProjector',
                                  'ScaleKDTeacher', 'StudentAdapter', 'create_timm_model', 'remove_dc'])
def test_public_api_stays_at_the_package_root(name):
    import scalekd
    assert name in scalekd.__all__ and getattr(scalekd, name) is not None
