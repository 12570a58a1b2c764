"""Key-name rules between two model layouts, usable both ways.

A rule pairs two templates: ``{i}`` is a number (``{i-1}``: that number minus one), a trailing ``*``
the rest of the key; ``('blocks.{i}.norm1.*', 'layers.{i}.ln1.*')`` renames ``blocks.3.norm1.weight``
to ``layers.3.ln1.weight`` and back.
"""
import functools
import re
from typing import Dict, Optional, Sequence, Tuple

__all__ = ['Rule', 'rename']

Rule = Tuple[str, str]  # (timm template, other template)
_SLOT = re.compile(r'\{(\w+)([+-]\d+)?\}|\*$')


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> Tuple[re.Pattern, Tuple[Tuple[str, int], ...]]:
    """A template as a regex, and the (name, offset) of each numbered slot in order."""
    parts, slots, last = [], [], 0
    for m in _SLOT.finditer(template):
        parts.append(re.escape(template[last:m.start()]))
        if m.group(0) == '*':
            parts.append('(.+)')
        else:
            parts.append(r'(\d+)')
            slots.append((m.group(1), int(m.group(2) or 0)))
        last = m.end()
    parts.append(re.escape(template[last:]))
    return re.compile(''.join(parts)), tuple(slots)


def _fill(template: str, values: Dict[str, int], rest: Optional[str]) -> str:
    def slot(m: re.Match) -> str:
        return rest if m.group(0) == '*' else str(values[m.group(1)] + int(m.group(2) or 0))
    return _SLOT.sub(slot, template)


def rename(key: str, rules: Sequence[Rule], reverse: bool = False) -> Optional[str]:
    """``key`` renamed by the first rule that matches it (right to left when ``reverse``), else None."""
    for rule in rules:
        src, dst = rule[::-1] if reverse else rule
        pattern, slots = _pattern(src)
        m = pattern.fullmatch(key)
        if m is None:
            continue
        groups = m.groups()
        values = {name: int(g) - offset for (name, offset), g in zip(slots, groups)}
        rest = groups[-1] if src.endswith('*') else None
        return _fill(dst, values, rest)
    return None
