"""Held-out metrics for the byte LM as an ``evaluate`` module that ships with the project (no hub access).

``evaluate.load`` is given this file's own path; it imports a copy of it, so this module imports only
``datasets`` and ``evaluate`` and keeps the metric class self-contained.

    metric = load_metric()
    metric.add_batch(predictions=..., references=..., nll=...)
    metric.compute()  # {"accuracy": ..., "perplexity": ..., "loss": ...}
"""

import math

import datasets
import evaluate

_DESCRIPTION = "Next-byte accuracy, mean negative log-likelihood (nats per byte) and perplexity."
_INPUTS = """
Args:
    predictions: predicted next bytes (argmax of the logits), ints.
    references: the true next bytes, ints.
    nll: the negative log-likelihood of each reference byte, in nats, computed in float32.
Returns:
    accuracy, loss (mean nll), perplexity (exp of the mean nll).
"""


class ByteLMMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "nll": datasets.Value("float64"),
                }
            ),
        )

    def _compute(self, predictions, references, nll):
        n = len(references)
        if n == 0:
            return {"accuracy": float("nan"), "loss": float("nan"), "perplexity": float("nan")}
        correct = sum(int(p == r) for p, r in zip(predictions, references, strict=True))
        loss = math.fsum(nll) / n
        return {"accuracy": correct / n, "loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def load_metric(**kwargs):
    """Load this module through ``evaluate`` from the local file."""
    return evaluate.load(__file__, **kwargs)
