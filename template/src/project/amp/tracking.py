"""``metrics.jsonl`` as an Accelerate tracker, and how each tracker picks up the same run after a resume.

With :class:`JsonlTracker` in ``Accelerator(log_with=[...])``, ``accelerator.log`` is the one sink: the JSON-lines
file, TensorBoard, W&B and the rest get the same records at the same steps.

On resume, :func:`resume_kwargs` builds ``init_trackers(init_kwargs=...)`` so that a resumed run continues its
tracker run instead of starting another: W&B gets the saved run id (``resume="allow"``); TensorBoard gets
``purge_step`` so the events a killed run logged after its checkpoint are dropped, as ``metrics.jsonl`` drops them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

from .settings import flat


class JsonlTracker(GeneralTracker):
    """One JSON object per ``accelerator.log`` call: ``{"step": N, "train/loss": ...}`` (main process only)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self) -> Path:
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        """The configuration goes into every checkpoint's meta.json instead."""

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}, default=float) + "\n")


def run_ids(accelerator: Any) -> dict[str, str]:
    """The ids of the tracker runs in progress that can be resumed (saved in checkpoint metadata)."""
    ids: dict[str, str] = {}
    for tracker in getattr(accelerator, "trackers", []):
        if tracker.name == "wandb":
            run = getattr(tracker, "run", None)
            if getattr(run, "id", None):
                ids["wandb"] = str(run.id)
        elif tracker.name == "mlflow":
            run = getattr(tracker, "active_run", None)
            run_id = getattr(getattr(run, "info", None), "run_id", None)
            if run_id:
                ids["mlflow"] = str(run_id)
    return ids


def resume_kwargs(names: list[str], user: dict[str, dict], saved_ids: dict[str, str] | None,
                  step: int | None) -> dict[str, dict]:
    """``init_kwargs`` for ``accelerator.init_trackers``: the user's, plus what continues a resumed run."""
    kwargs = copy.deepcopy({k: dict(v) for k, v in (user or {}).items()})
    if step is None:  # a fresh run
        return kwargs
    ids = saved_ids or {}
    if "wandb" in names and "wandb" in ids:
        kwargs.setdefault("wandb", {}).setdefault("id", ids["wandb"])
        kwargs["wandb"].setdefault("resume", "allow")
    if "mlflow" in names and "mlflow" in ids:
        kwargs.setdefault("mlflow", {}).setdefault("run_id", ids["mlflow"])
    if "tensorboard" in names:
        # events at steps after the checkpoint were logged by the run that was killed: hide them
        kwargs.setdefault("tensorboard", {}).setdefault("purge_step", step + 1)
    return kwargs


class Trackers:
    """The run's trackers: ``metrics.jsonl`` first, then the settings' ``trackers`` and the loop's own ``log_with``
    (names or tracker objects, as Accelerate takes them). :meth:`start` runs ``init_trackers`` once, continuing a
    resumed run's tracker runs. ``config`` (nested sections are fine) becomes the trackers' hyperparameters as flat
    ``section.key`` values. The run's name: the settings' ``run_name``, else the name of out_dir."""

    def __init__(self, metrics: Path, settings: Any, log_with: Any = None, config: dict[str, Any] | None = None):
        user = [*settings.trackers, *([log_with] if isinstance(log_with, str) else log_with or [])]
        self.names = [t if isinstance(t, str) else t.name for t in user]
        self.log_with = [JsonlTracker(metrics), *user]  # for Accelerator(log_with=...)
        self.run_name, self.kwargs = settings.run_name or metrics.parent.resolve().name, settings.tracker_kwargs or {}
        self.config = None if config is None else flat(config)
        self.started = False

    def start(self, accelerator: Any, meta: dict[str, Any] | None = None, step: int | None = None) -> None:
        """``init_trackers`` (once); ``meta``/``step``: the checkpoint a run resumed from, whose runs continue."""
        if self.started:
            return
        self.started = True
        kwargs = resume_kwargs(self.names, self.kwargs, (meta or {}).get("trackers"), step if meta is not None else None)
        accelerator.init_trackers(self.run_name, config=self.config, init_kwargs=kwargs)
