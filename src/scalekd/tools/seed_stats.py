"""Statistics over seeds: the spread of a row, and paired differences of two rows trained on the same seeds."""
import statistics
from typing import Sequence, Tuple

__all__ = ['spread', 'paired']


def spread(values: Sequence[float]) -> float:
    """The standard deviation over seeds (0 for one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """Mean and spread of ``a - b`` seed by seed (runs of one seed see the same batches)."""
    diffs = [x - y for x, y in zip(a, b)]
    return statistics.mean(diffs), spread(diffs)
