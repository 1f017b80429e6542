"""Held-out metrics for the byte LM as an ``evaluate`` module shipped with the project (it imports only ``datasets``
and ``evaluate``), fed one row of sums per batch: evaluate stores each row in an Arrow file."""

import math

import datasets
import evaluate

_DESCRIPTION = "Next-byte accuracy, mean negative log-likelihood (nats per byte) and perplexity, from per-batch sums."
_INPUTS = """
Args:
    correct: per batch, the number of bytes whose prediction (argmax of the logits) is the true next byte.
    count: per batch, the number of predicted bytes.
    nll_sum: per batch, the sum of the negative log-likelihoods of the true bytes, in nats (computed in float32).
Returns:
    accuracy (correct / count), loss (nll_sum / count, the mean nll per byte), perplexity (exp of the loss);
    all nan when count is 0.
"""


class ByteLMMetrics(evaluate.Metric):
    def _info(self):
        features = {"correct": datasets.Value("int64"), "count": datasets.Value("int64"),
                    "nll_sum": datasets.Value("float64")}
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
                                   features=datasets.Features(features))

    def _compute(self, correct, count, nll_sum):
        n = sum(count)
        if n == 0:
            return {"accuracy": float("nan"), "loss": float("nan"), "perplexity": float("nan")}
        loss = math.fsum(nll_sum) / n
        try:
            perplexity = math.exp(loss)
        except OverflowError:  # a diverged model: loss above ~709 nats
            perplexity = math.inf
        return {"accuracy": sum(correct) / n, "loss": loss, "perplexity": perplexity}


def load_metric(**kwargs):
    """Load this module through ``evaluate`` from the local file."""
    return evaluate.load(__file__, **kwargs)
