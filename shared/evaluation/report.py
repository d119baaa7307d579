"""results.md and PNG plots of an evaluation run."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.evaluation.run import Results

PLOTTED_METRICS = ("ndcg", "precision", "recall", "map", "hit_rate")
TOP_FEATURES = 20
GROUPS_TITLE = "Per user group (without_history: no train event, a cold-start answer)"


def metric_columns(k: int) -> list[str]:
    return [f"{name}@{k}" for name in PLOTTED_METRICS] + ["coverage"]


def markdown_table(results: Results) -> str:
    columns = metric_columns(results.k)
    lines = [
        "| method | kind | " + " | ".join(columns) + " | seconds |",
        "|---|---|" + "---:|" * (len(columns) + 1),
    ]
    best_baseline = max(
        (m.metrics[f"ndcg@{results.k}"] for m in results.methods if m.kind == "baseline"), default=float("nan")
    )
    for method in sorted(results.methods, key=lambda m: -m.metrics[f"ndcg@{results.k}"]):
        cells = [f"{method.metrics[column]:.4f}" for column in columns]
        name = f"**{method.name}**" if method.name == "vitrine" else method.name
        lines.append(f"| {name} | {method.kind} | " + " | ".join(cells) + f" | {method.seconds:.1f} |")
    vitrine = results.method("vitrine").metrics[f"ndcg@{results.k}"]
    lines.append("")
    lines.append(
        f"vitrine NDCG@{results.k} {vitrine:.4f} vs best tuned baseline {best_baseline:.4f}: "
        f"{100 * (vitrine / best_baseline - 1):+.1f}%"
    )
    return "\n".join(lines)


def group_table(results: Results) -> str:
    """NDCG@k and hit rate per user group (run.user_groups); "" when the split has one group."""
    groups = next((list(m.by_group) for m in results.methods if m.by_group), [])
    if not groups:
        return ""
    first = next(m for m in results.methods if m.by_group)
    columns = [(group, metric) for group in groups for metric in (f"ndcg@{results.k}", f"hit_rate@{results.k}")]
    header = " | ".join(f"{group} ({int(first.by_group[group]['users'])} users) {metric}" for group, metric in columns)
    lines = [f"| method | {header} |", "|---|" + "---:|" * len(columns)]
    for method in sorted(results.methods, key=lambda m: -m.metrics[f"ndcg@{results.k}"]):
        name = f"**{method.name}**" if method.name == "vitrine" else method.name
        lines.append(f"| {name} | " + " | ".join(f"{method.by_group[g][metric]:.4f}" for g, metric in columns) + " |")
    return "\n".join(lines)


def write_report(results: Results, out: Path) -> None:
    tuned = "\n".join(
        f"- {m.name}: " + ", ".join(f"{key}={value}" for key, value in m.params.items())
        for m in results.methods
        if m.params
    )
    curve = "\n".join(f"| {n} | {recall:.4f} |" for n, recall in results.candidate_recall.items())
    by_group = group_table(results)
    groups = f"{GROUPS_TITLE}:\n\n{by_group}\n\n" if by_group else ""
    (out / "results.md").write_text(
        f"# {results.dataset}, protocol {results.protocol}, k={results.k}, seed {results.seed}\n\n"
        f"{markdown_table(results)}\n\n"
        f"{groups}"
        f"Split: {results.split}\n\n"
        f"Tuned on a validation split carved from train:\n{tuned}\n\n"
        f"Candidate recall@N (share of test items among the fused index's N candidates):\n\n"
        f"| N | recall |\n|---:|---:|\n{curve}\n\n"
        "![metrics](metrics.png) ![candidate recall](candidate_recall.png) ![features](feature_importance.png)\n"
    )
    _plots(results, out)


def _plots(results: Results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    methods = sorted(results.methods, key=lambda m: m.metrics[f"ndcg@{results.k}"])
    columns = [f"{name}@{results.k}" for name in PLOTTED_METRICS]
    figure, axis = plt.subplots(figsize=(10, 0.5 * len(methods) * len(columns) / 2 + 2))
    height = 0.8 / len(columns)
    for position, column in enumerate(columns):
        values = [m.metrics[column] for m in methods]
        axis.barh([i + position * height for i in range(len(methods))], values, height=height, label=column)
    axis.set_yticks([i + 0.4 - height / 2 for i in range(len(methods))], [m.name for m in methods])
    axis.set_title(f"{results.dataset} ({results.protocol} split)")
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out / "metrics.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    sizes = list(results.candidate_recall)
    axis.plot(sizes, [results.candidate_recall[n] for n in sizes], marker="o")
    axis.set_xlabel("N candidates")
    axis.set_ylabel("share of test items retrieved")
    axis.set_title("Candidate recall@N (fused index)")
    axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "candidate_recall.png", dpi=100)
    plt.close(figure)

    top = sorted(results.feature_importance.items(), key=lambda item: item[1])[-TOP_FEATURES:]
    figure, axis = plt.subplots(figsize=(7, 0.3 * len(top) + 1.5))
    axis.barh([name for name, _ in top], [gain for _, gain in top])
    axis.set_xlabel("total gain")
    axis.set_title("Ranker feature importance")
    figure.tight_layout()
    figure.savefig(out / "feature_importance.png", dpi=100)
    plt.close(figure)
