"""Held-out metrics for the U-Net as an ``evaluate`` module shipped with the project, fed one row of sums per batch;
Dice and IoU from pixel counts summed over the split per class, then averaged over the classes."""

import math

import datasets
import evaluate

SHAPES = ("circle", "square", "triangle")  # class ids 1, 2, 3; 0 is the background
FIELDS = (*(f"{kind}_{s}" for s in SHAPES for kind in ("inter", "pred", "true")), "correct", "pixels", "nll_sum")

_DESCRIPTION = "Dice, IoU, pixel accuracy and cross-entropy of a segmentation into background and three shapes."
_INPUTS = """
Args:
    inter_SHAPE: per batch, the pixels of class SHAPE (circle, square, triangle) predicted as SHAPE.
    pred_SHAPE: per batch, the pixels predicted as SHAPE (argmax of the logits).
    true_SHAPE: per batch, the pixels whose label is SHAPE.
    correct: per batch, the pixels whose prediction is their label (background included).
    pixels: per batch, the number of pixels.
    nll_sum: per batch, the sum of the per-pixel cross-entropy, in nats (computed in float32).
    All are numbers (float64: the eval loop sums in double precision).
Returns:
    dice_SHAPE (2 inter / (pred + true)) and iou_SHAPE (inter / (pred + true - inter)), nan for a shape neither
    present nor predicted; mean_dice and mean_iou over the shapes that are not nan (nan if none); accuracy
    (correct / pixels) and loss (nll_sum / pixels), nan when pixels is 0.
"""


class ShapesSegmentationMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
                                   features=datasets.Features({name: datasets.Value("float64") for name in FIELDS}))

    def _compute(self, **columns):
        total = {name: math.fsum(columns[name]) for name in FIELDS}
        out = {}
        for s in SHAPES:
            inter, both = total[f"inter_{s}"], total[f"pred_{s}"] + total[f"true_{s}"]
            out[f"dice_{s}"] = 2 * inter / both if both else math.nan
            out[f"iou_{s}"] = inter / (both - inter) if both else math.nan
        for name in ("dice", "iou"):
            values = [out[f"{name}_{s}"] for s in SHAPES if not math.isnan(out[f"{name}_{s}"])]
            out[f"mean_{name}"] = sum(values) / len(values) if values else math.nan
        n = total["pixels"]
        out["accuracy"] = total["correct"] / n if n else math.nan
        out["loss"] = total["nll_sum"] / n if n else math.nan
        first = ("mean_dice", "mean_iou", *(f"dice_{s}" for s in SHAPES), "accuracy", "loss")
        return {k: out[k] for k in (*first, *(k for k in out if k not in first))}


def load_metric(**kwargs):
    """Load this module through ``evaluate`` from the local file."""
    return evaluate.load(__file__, **kwargs)
