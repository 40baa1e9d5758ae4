"""Classification metrics from a confusion matrix: loss, accuracy, macro-F1."""

from __future__ import annotations

import numpy as np


def summarize(loss_sum: float, count: float, confusion: np.ndarray) -> dict[str, float]:
  """Returns loss, accuracy and macro-F1 from summed statistics.

  Args:
    loss_sum: cross-entropy summed over the evaluated examples.
    count: number of evaluated examples.
    confusion: [num_classes, num_classes] counts, rows = labels, columns = predictions.

  Returns:
    {'loss', 'accuracy', 'macro_f1', 'count'}; F1 averages over every class that
    occurs as a label or a prediction.
  """
  confusion = np.asarray(confusion, np.float64)
  true_pos = np.diag(confusion)
  denominators = confusion.sum(0) + confusion.sum(1)
  present = denominators > 0
  f1 = 2 * true_pos[present] / denominators[present]
  count = float(count)
  return {
      "loss": float(loss_sum) / max(count, 1.0),
      "accuracy": float(true_pos.sum()) / max(count, 1.0),
      "macro_f1": float(f1.mean()) if f1.size else 0.0,
      "count": count,
  }
