"""What every experiment table shares: mean ± std cells, verdicts paired by seed, CSV records and
line plots in one look (plots.style)."""
from __future__ import annotations

import csv
import statistics

from .plots import pyplot, style


def mean_std(values: list) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: list, digits: int = 1) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def verdict(ours: list, theirs: list, expect_greater: bool, claim: str, what: str) -> str:
    """The direction of ours - theirs (one value per seed each, paired) against the poster's claim,
    decided when the mean difference is larger than its standard deviation over the seeds."""
    difference, spread = mean_std([a - b for a, b in zip(ours, theirs)])
    if abs(difference) <= spread:
        word = "inconclusive"
    else:
        word = "reproduced" if (difference > 0) == expect_greater else "not reproduced"
    return (f"verdict: {word}. {claim}: {what} {statistics.fmean(ours):.2f} against {statistics.fmean(theirs):.2f}, "
            f"difference {difference:+.2f} ± {spread:.2f} over {len(ours)} seeds")


def per_seed(rows: dict, suffix: str, columns: list) -> list:
    """For each seed, the mean of the values of the rows ending in `suffix`, over `columns`."""
    cells = [rows[key][column] for key in rows if key.endswith(suffix) for column in columns]
    return [statistics.fmean(cell[seed] for cell in cells) for seed in range(len(cells[0]))]


def print_table(title: str, columns: list, rows: dict, digits: int = 1) -> None:
    """rows: label -> {column: [values over seeds]}"""
    width = max([len(r) for r in rows] + [12])
    print(f"\n{title}")
    print(f"{'':<{width}}  " + "  ".join(f"{c:>15}" for c in columns))
    for label, values in rows.items():
        print(f"{label:<{width}}  " + "  ".join(f"{cell(values[c], digits) if values.get(c) else '-':>15}"
                                                for c in columns))


def write_csv(path: str, records: list) -> None:
    """records (dicts) as CSV rows, the columns every key of any of them in first-seen order (empty where missing)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for record in records for key in record)))
        writer.writeheader()
        writer.writerows(records)


def series(values: dict, prefix: str, start: int) -> list:
    """(k, mean over seeds) of the columns f"{prefix} {k} %", k = start, start + 1, ..."""
    count = sum(column.startswith(prefix + " ") for column in values)
    return [(k, statistics.fmean(values[f"{prefix} {k} %"])) for k in range(start, start + count)]


def plot_lines(path: str, rows: dict, points, xlabel: str, ylabel: str) -> None:
    """One line per table row (mean over seeds), a panel per data set; a color per connectivity, a
    line style per model (plots.style)."""
    plt = pyplot("paper", "paper's plots")
    datasets = sorted({key.split()[0] for key in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for key, values in rows.items():
            if key.split()[0] == dataset:
                xs, ys = zip(*points(values))
                label = key.split(" ", 1)[1]
                ax.plot(xs, ys, label=label, **style(label))
        ax.set_title(dataset)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
