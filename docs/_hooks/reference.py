"""MkDocs hook: the configuration and CLI reference pages, generated from the code at every build.

Every key of the run config comes from the config dataclasses (type, default, the allowed values of
``scalekd.engine.inputs.config_rules`` and the description in its class's ``Attributes:`` docstring section);
every subcommand and option comes from the ``scalekd`` argument parser. A key or an option without a
description, or a description of no key, fails the build (``tests/test_docs.py`` names it), so neither page can
drift from the code.
"""
import argparse
import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import yaml

__all__ = ['ConfigKey', 'config_keys', 'attribute_docs', 'config_key_faults', 'cli_option_faults', 'config_page',
           'cli_page', 'on_files']

CONFIG_PAGE, CLI_PAGE = 'reference/config.md', 'reference/cli.md'


@dataclass(frozen=True)
class ConfigKey:
    """One dotted key of the run config."""
    key: str
    type: str
    default: str
    allowed: str
    description: str


def attribute_docs(cls: type) -> Dict[str, str]:
    """``name -> description`` from the ``Attributes:`` section of ``cls``'s Google-style docstring
    (continuation lines joined)."""
    lines = inspect.cleandoc(cls.__doc__ or '').splitlines()
    docs: Dict[str, str] = {}
    try:
        start = lines.index('Attributes:') + 1
    except ValueError:
        return docs
    name = None
    for line in lines[start:]:
        if line and not line.startswith(' '):
            break  # the next section
        entry = re.match(r'^    (\w+)(?: \([^)]*\))?: (.*)$', line)
        if entry:
            name = entry.group(1)
            docs[name] = entry.group(2).strip()
        elif name and line.startswith('        '):
            docs[name] += ' ' + line.strip()
    return docs


def inherited_docs(cls: type) -> Dict[str, str]:
    """:func:`attribute_docs` of ``cls`` and of the dataclasses it derives from (its own win)."""
    docs: Dict[str, str] = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        docs.update(attribute_docs(base))
    return docs


def list_item(tp: Any) -> Optional[type]:
    """The dataclass of a ``list of dataclass`` (or null) type hint, else ``None``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
    if len(args) == 1 and typing.get_origin(args[0]) is list:
        item = typing.get_args(args[0])[0]
        return item if dataclasses.is_dataclass(item) else None
    return None


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return ' or '.join(names) + (' or null' if type(None) in args else '')
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return '[' + ', '.join(_type_name(a) for a in args) + ']'
        return f'list of {_type_name(args[0])}' if args else 'list'
    if origin is dict:
        return 'mapping'
    return getattr(tp, '__name__', str(tp))


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return yaml.safe_dump(_plain(value), default_flow_style=True, width=1000).strip().removesuffix('\n...').strip()


def _allowed() -> Dict[str, str]:
    from scalekd.engine.inputs.config_rules import RULES
    return {rule.key: rule.allowed for rule in RULES}


def _run_config() -> type:
    from scalekd.engine.inputs.config import RunConfig
    return RunConfig


def config_keys(root: Optional[type] = None) -> Dict[str, List[ConfigKey]]:
    """Every key of the run config (``root``, default :class:`scalekd.engine.inputs.config.RunConfig`), by section
    (``''``: the top level)."""
    root = root or _run_config()
    allowed = _allowed()
    sections: Dict[str, List[ConfigKey]] = {'': []}

    def rows(cls: type, prefix: str) -> List[ConfigKey]:
        hints, docs = typing.get_type_hints(cls), inherited_docs(cls)
        return [ConfigKey(prefix + f.name, _type_name(hints[f.name]), _default(f), allowed.get(prefix + f.name, ''),
                          docs.get(f.name, '')) for f in dataclasses.fields(cls)]

    hints, docs = typing.get_type_hints(root), attribute_docs(root)
    for f in dataclasses.fields(root):
        if dataclasses.is_dataclass(hints[f.name]):
            sections[f.name] = rows(hints[f.name], f'{f.name}.')
        elif list_item(hints[f.name]) is not None:  # a list of sections (``teachers``): its items' keys
            sections[f.name] = rows(list_item(hints[f.name]), f'{f.name}[].')
        else:
            sections[''].append(ConfigKey(f.name, _type_name(hints[f.name]), _default(f), allowed.get(f.name, ''),
                                          docs.get(f.name, '')))
    return sections


def config_key_faults(root: Optional[type] = None) -> List[str]:
    """Each config key (or section) without a description, and each description of no key."""
    root = root or _run_config()
    sections = config_keys(root)
    faults = [f'{k.key}: no description' for rows in sections.values() for k in rows if not k.description]
    faults += [f'{s}: no description' for s in sections if s and not attribute_docs(root).get(s)]
    hints = typing.get_type_hints(root)
    for cls, prefix in [(root, '')] + [(list_item(hints[s]) or hints[s], f'{s}.') for s in sections if s]:
        names = {f.name for f in dataclasses.fields(cls)}
        faults += [f'{prefix}{name}: described in {cls.__name__} but not a key' for name in attribute_docs(cls)
                   if name not in names]
    return faults


def _cell(text: str) -> str:
    return text.replace('|', '\\|').replace('\n', ' ')


def config_page() -> str:
    """The configuration reference in Markdown."""
    section_docs = attribute_docs(_run_config())
    out = ['# Configuration reference', '',
           'Generated from the config dataclasses when the documentation is built. A run config is YAML; '
           '`base:` starts it from other files (paths relative to it, later values win, mappings merge), '
           'and `-o key=value` overrides any key (values read as YAML). An unknown key, a wrong type or a '
           'value out of its range is an error naming the key and the file. '
           '`scalekd config show CONFIG` prints a config with every default, base and override resolved.', '']
    for section, rows in config_keys().items():
        title = f'`{section}`' if section else 'Top level'
        out += [f'## {title}', '']
        if section:
            out += [section_docs[section][:1].upper() + section_docs[section][1:], '']
        out += ['| key | type | default | allowed | meaning |', '|---|---|---|---|---|']
        out += [f'| `{k.key}` | {_cell(k.type)} | `{_cell(k.default)}` | {_cell(k.allowed)} | {_cell(k.description)} |'
                for k in rows]
        out.append('')
    return '\n'.join(out)


def _subcommands(parser: argparse.ArgumentParser) -> Dict[str, tuple]:
    """``name -> (help, parser)`` of each subcommand, recursively (``config show``)."""
    found: Dict[str, tuple] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                found[name] = (helps.get(name), sub)
                found.update({f'{name} {k}': v for k, v in _subcommands(sub).items()})
    return found


def _options(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    return [a for a in parser._actions
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def cli_option_faults() -> List[str]:
    """Each subcommand or option of the ``scalekd`` parser without a help text."""
    from scalekd.cli import build_parser
    parser = build_parser()
    faults = [f'scalekd {a.option_strings[-1]}: no help' for a in _options(parser) if not a.help]
    for name, (text, sub) in _subcommands(parser).items():
        if not text:
            faults.append(f'{name}: no help')
        faults += [f'{name} {a.option_strings[-1] if a.option_strings else a.dest}: no help'
                   for a in _options(sub) if not a.help]
    return faults


def _option_row(action: argparse.Action) -> str:
    names = ', '.join(f'`{s}`' for s in action.option_strings) or f'`{action.metavar or action.dest}`'
    if action.option_strings and action.nargs != 0:
        value = action.metavar or (action.dest.upper() if not action.choices else '{' + ','.join(map(str, action.choices)) + '}')
        names += f' `{value}`'
    text = (action.help or '') % {'default': action.default, 'prog': 'scalekd'}
    shown = action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0 and 'default' not in text
    default = f'`{action.default}`' if shown else ''  # a help that names its default says it best (machine-dependent ones)
    flags = ' (repeatable)' if isinstance(action, argparse._AppendAction) and 'repeatable' not in text else ''
    required = 'yes' if action.required or not action.option_strings else ''
    return f'| {names} | {_cell(text)}{flags} | {default} | {required} |'


def cli_page() -> str:
    """The command-line reference in Markdown."""
    from scalekd.cli import build_parser
    parser = build_parser()
    commands = {name: value for name, value in _subcommands(parser).items()  # leaves, not groups
                if not any(isinstance(a, argparse._SubParsersAction) for a in value[1]._actions)}
    out = ['# Command-line reference', '',
           'Generated from the `scalekd` argument parser when the documentation is built. Every command '
           'prints its options with `scalekd COMMAND --help`. A user error (a bad option, a missing file, a '
           'config key out of range) prints one line and exits with 2.', '',
           '| command | what it does |', '|---|---|']
    out += [f'| [`scalekd {name}`](#{name.replace(" ", "-")}) | {_cell(text)} |' for name, (text, _) in commands.items()]
    out += ['', '## Options of every command', '', 'Given before the command: `scalekd [OPTION] COMMAND ...`.', '',
            '| option | meaning | default | required |', '|---|---|---|---|']
    out += [_option_row(a) for a in _options(parser)]
    out.append('')
    for name, (text, sub) in commands.items():
        sub.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=100)
        out += [f'## {name}', '', text[:1].upper() + text[1:] + '.', '', '```text', sub.format_usage().strip(), '```', '',
                '| option | meaning | default | required |', '|---|---|---|---|']
        out += [_option_row(a) for a in _options(sub)]
        out.append('')
    return '\n'.join(out)


def on_files(files, config):
    """Add the two generated pages; a key or option without a description fails the build."""
    from mkdocs.exceptions import PluginError
    from mkdocs.structure.files import File
    faults = config_key_faults() + cli_option_faults()
    if faults:
        raise PluginError(f'the references cannot be generated: {"; ".join(faults)}')
    for uri, text in ((CONFIG_PAGE, config_page()), (CLI_PAGE, cli_page())):
        files.append(File.generated(config, uri, content=text))
    return files
