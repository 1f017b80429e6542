"""Predict the class of a few held-out blobs."""

import sys

from ..export import ExportError, device_arg, load_model
from . import _blobs


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        model, source = load_model(argv[0] if argv else "runs/default", device_arg("cpu"))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"sample: {source}", file=sys.stderr)
    x, y = _blobs(8, model.net[0].in_features, model.net[-1].out_features, 99)
    print("predicted", model(x).argmax(-1).tolist(), "true", y.tolist())
    return 0
