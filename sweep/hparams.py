"""TensorBoard HParams records of a sweep's trials, written by the driver into each trial's folder.

Not a command; ``tensorboard --logdir results/<sweep>`` shows the result. Each trial folder
``trials/<trial_id>/`` is one TensorBoard run: ``core.train`` writes its per-epoch scalars there, and
this module adds, in separate event files,

- at trial start: the session-start record with the trial's sampled parameters (so running and
  failed trials have their row in the HParams table too);
- at trial end: scalars ``sweep/<metric>_final``, ``sweep/<metric>_best`` and ``sweep/epochs_run``
  and the session-end record (success, or failure for a trial that raised).

TensorBoard builds the HParams table from these: one row per trial, with its parameters and the last
value of every scalar in its run as metric columns (table and parallel-coordinates views).
Values are plain Python bool/float/str (numpy scalars and non-scalars are what break Ray's logger).
"""

from __future__ import annotations

import math
import numbers
import time
from pathlib import Path
from typing import Any, Mapping

from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2, summary_v2


def plain_hparams(params: Mapping[str, Any]) -> dict[str, bool | float | str]:
    """Parameters as the types TensorBoard's hparams plugin takes (numpy scalars unwrapped)."""
    out: dict[str, bool | float | str] = {}
    for key, value in params.items():
        if hasattr(value, "item") and callable(value.item):
            value = value.item()  # numpy scalar
        if isinstance(value, (bool, str)):
            out[key] = value
        elif isinstance(value, numbers.Real):
            out[key] = float(value)
        else:
            out[key] = str(value)
    return out


def write_session_start(run_dir: str | Path, trial_id: str, params: Mapping[str, Any],
                        start_time: float | None = None) -> None:
    """The HParams row of a trial: its sampled parameters, recorded when it starts."""
    summary = summary_v2.hparams_pb(plain_hparams(params), trial_id=trial_id,
                                    start_time_secs=start_time or time.time())
    _write(run_dir, [(summary, 0)])


def write_session_end(run_dir: str | Path, metrics: Mapping[str, float], failed: bool, step: int) -> None:
    """The trial's summary scalars (metric columns of the HParams table) and its end status."""
    from torch.utils.tensorboard.summary import scalar

    summaries = [(scalar(tag, float(value)), step) for tag, value in metrics.items()
                 if value is not None and math.isfinite(float(value))]
    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS,
                                          end_time_secs=time.time())
    end = summary_pb2.Summary()
    end.value.add(tag=metadata.SESSION_END_INFO_TAG, tensor=metadata.NULL_TENSOR,
                  metadata=metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(session_end_info=info)))
    _write(run_dir, summaries + [(end, step)])


def _write(run_dir: str | Path, summaries: list[tuple[Any, int]]) -> None:
    # Its own short-lived event file: never interleaved with core.train's writer in the same run.
    from torch.utils.tensorboard.writer import FileWriter

    writer = FileWriter(str(run_dir))
    try:
        for summary, step in summaries:
            writer.add_summary(summary, global_step=step)
    finally:
        writer.close()
