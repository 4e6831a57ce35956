"""Classification metrics as pure functions over label-id lists."""

from __future__ import annotations


def confusion_matrix(labels: list[int], predictions: list[int], num_classes: int) -> list[list[int]]:
    """matrix[true][predicted] counts."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for truth, guess in zip(labels, predictions):
        matrix[truth][guess] += 1
    return matrix


def accuracy(labels: list[int], predictions: list[int]) -> float:
    return sum(t == p for t, p in zip(labels, predictions)) / len(labels) if labels else 0.0


def per_class_scores(matrix: list[list[int]]) -> list[dict[str, float]]:
    """Precision, recall, F1 and support per class; a class never predicted has precision 0."""
    scores = []
    for k in range(len(matrix)):
        true_positive = matrix[k][k]
        predicted = sum(row[k] for row in matrix)
        support = sum(matrix[k])
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores.append({"precision": precision, "recall": recall, "f1": f1, "support": support})
    return scores


def macro_f1(matrix: list[list[int]]) -> float:
    """Mean F1 over the classes that occur in the labels."""
    present = [s["f1"] for s in per_class_scores(matrix) if s["support"]]
    return sum(present) / len(present) if present else 0.0


def classification_report(labels: list[int], predictions: list[int], names: list[str]) -> dict:
    matrix = confusion_matrix(labels, predictions, len(names))
    per_class = {name: scores for name, scores in zip(names, per_class_scores(matrix))}
    return {"accuracy": accuracy(labels, predictions), "f1": macro_f1(matrix),
            "per_class": per_class, "confusion_matrix": matrix}


def format_report(report: dict, names: list[str]) -> str:
    """A terminal table: per-class precision/recall/F1, then the confusion matrix."""
    width = max(12, *(len(n) + 2 for n in names))
    lines = [f"accuracy {report['accuracy']:.4f}   macro-F1 {report['f1']:.4f}", "",
             f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name in names:
        s = report["per_class"][name]
        lines.append(f"{name:<{width}}{s['precision']:>10.4f}{s['recall']:>10.4f}{s['f1']:>10.4f}{s['support']:>10d}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)",
              " " * width + "".join(f"{n[:9]:>10}" for n in names)]
    for name, row in zip(names, report["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>10d}" for v in row))
    return "\n".join(lines)
