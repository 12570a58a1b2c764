"""Figures (matplotlib, written to files; no display needed)."""
from pathlib import Path
from typing import Any, Dict, Union

__all__ = ['pyplot', 'save_figure', 'plot_curves']


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Union[str, Path]) -> Path:
    """Lay out, write and close a matplotlib figure."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def plot_curves(results: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Test top-1 per epoch of every demo run: one panel per student, one line per method, the teacher dashed;
    the legend gives each run's final top-1 on the whole test split."""
    plt = pyplot()
    students = results['students']
    fig, axes = plt.subplots(1, len(students), figsize=(4.2 * len(students), 3.6), squeeze=False, sharey=True)
    for ax, (name, row) in zip(axes[0], students.items()):
        for label, curve in row['curves'].items():
            ax.plot(range(1, len(curve) + 1), curve, marker='o', markersize=3, label=f"{label} ({row[f'{label}_top1']:.2f})")
        ax.axhline(results['teacher_top1'], color='k', linestyle='--', linewidth=1,
                   label=f'teacher ({results["teacher_top1"]:.1f})')
        ax.set_title(f'{name}: {row["model"]}')
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc='lower right')
    axes[0][0].set_ylabel('test top-1 (%)')
    sample = results['settings'].get('test_sample')
    fig.suptitle(f'per epoch: top-1 on {sample:,} test images; in the legend: final top-1 on the whole test split',
                 fontsize=9)
    return save_figure(fig, path)
