"""``EXP_DIR/tensorboard/``: one TensorBoard run per trial, so the HParams dashboard compares them all.

Each ``trial_<id>/`` run holds an HParams session (the searched values) and the trial's
val/* and test/* curves, copied from its own event files with TensorBoard's reader; the
root run holds the experiment-level HParams config. The folder is built beside the old one
and swapped in, so a running TensorBoard never sees it half-written.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common.atomic import move_into_place
from ..run.tb_logger import hparam_value
from .leaderboard import EVAL_PREFIXES, is_count
from .records import finite_number

TENSORBOARD_DIR = "tensorboard"


def _domain(entry: dict):
    """The HParams domain of a search-space entry (None for rules and mixed-type choices)."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    kind = entry.get("type")
    if kind in ("loguniform", "uniform"):
        return hp.RealInterval(float(entry["low"]), float(entry["high"]))
    if kind == "int":
        return hp.IntInterval(int(entry["low"]), int(entry["high"]))
    values = entry.get("values") if kind in ("choice", "grid") else [entry.get("value")] if kind == "fixed" else None
    if not values:
        return None
    values = [hparam_value(v) for v in values]
    types = {bool if isinstance(v, bool) else str if isinstance(v, str) else float for v in values}
    if len(types) != 1:
        return None
    return hp.Discrete([float(v) for v in values] if types == {float} else values)


def _plugin_summary(tag: str, plugin_data):
    """A summary holding hparams plugin data (what ``summary_v2`` builds for the other two kinds)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata

    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(plugin_data), tensor=metadata.NULL_TENSOR)
    return summary


def _write_events(folder: Path, events: Sequence[tuple[float, int, Any]]) -> None:
    """Writes ``(wall_time, step, Summary)`` events to a new event file in ``folder``."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(folder))
    try:
        for wall_time, step, summary in events:
            writer.add_event(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))
    finally:
        writer.close()


def trial_curves(event_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """val/* and test/* scalars of a trial's own TensorBoard events: ``{tag: [(wall_time, step, value)]}``.

    Read with TensorBoard's ``EventAccumulator``. One value per step, the last written: a
    resumed trial may log an evaluation twice.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not event_dir.is_dir() or not any(event_dir.glob("*tfevents*")):
        return {}
    skip = {"images": 1, "audio": 1, "histograms": 1, "compressedHistograms": 1, "tensors": 1}
    events = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, **skip})
    # A resumed trial marks the steps it redoes (SummaryWriter's purge_step); TensorBoard then
    # drops the earlier copies and says so at WARNING, which is expected here, not news.
    tb_logger = logging.getLogger("tensorboard")
    level = tb_logger.level
    tb_logger.setLevel(logging.ERROR)
    try:
        events.Reload()
    finally:
        tb_logger.setLevel(level)
    curves = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(EVAL_PREFIXES) and not is_count(tag):
            by_step = {e.step: (e.wall_time, e.step, e.value) for e in events.Scalars(tag)}
            curves[tag] = [by_step[s] for s in sorted(by_step)]
    return curves


def _trial_events(record: dict, params: dict, curves: dict) -> list[tuple[float, int, Any]]:
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp

    if not curves:  # no event files (yet): the last reported evaluation, so the trial still compares
        step = record["metrics"].get("step") or 0
        curves = {k: [(time.time(), step, v)] for k, v in record["metrics"].items()
                  if k.startswith(EVAL_PREFIXES) and not is_count(k) and finite_number(v) is not None}
    started = min((points[0][0] for points in curves.values()), default=time.time())
    events = [(started, 0, hp.hparams_pb(params, trial_id=record["trial_id"], start_time_secs=started))]
    for tag, points in curves.items():
        for wall_time, step, value in points:
            events.append((wall_time, step, summary_pb2.Summary(value=[summary_pb2.Summary.Value(
                tag=tag, simple_value=value)])))
    status = {"TERMINATED": api_pb2.STATUS_SUCCESS, "ERROR": api_pb2.STATUS_FAILURE}.get(record["status"])
    if status is not None:  # running and pending trials have no session end yet
        ended = max((p[-1][0] for p in curves.values()), default=started)
        end = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
            status=status, end_time_secs=ended))
        last_step = max((p[-1][1] for p in curves.values()), default=0)
        events.append((ended, last_step, _plugin_summary(metadata.SESSION_END_INFO_TAG, end)))
    return events


def write_tensorboard(experiment_dir: Path, records: Sequence[dict], search_space: dict,
                      metrics: Sequence[str]) -> Path:
    """``EXP_DIR/tensorboard/``: one run per trial plus an experiment-level HParams config.

    Each ``trial_<id>/`` run holds an HParams session (the searched values, group = trial
    id; ended with success/failure once Tune finished the trial) and the trial's val/* and
    test/* curves. The root run holds the experiment config (every searched key with its
    domain, every metric) so the HParams dashboard lists and compares all trials. Built in
    a temporary folder and swapped in.
    """
    from tensorboard.plugins.hparams import summary_v2 as hp

    target = experiment_dir / TENSORBOARD_DIR
    building = experiment_dir / f".{TENSORBOARD_DIR}.{uuid.uuid4().hex[:8]}.tmp"
    building.mkdir()
    keys = [k for k in search_space if k != "points_to_evaluate"]
    tags: set[str] = set()
    for record in records:
        curves = trial_curves(Path(record["path"]) / "tensorboard")
        params = {key: hparam_value(record["params"].get(key)) for key in keys}
        run = building / f"trial_{record['trial_id']}"
        run.mkdir()
        events = _trial_events(record, params, curves)
        _write_events(run, events)
        tags.update(s.value[0].tag for _, _, s in events if s.value and s.value[0].tag.startswith(EVAL_PREFIXES))
    ordered = [*[m for m in metrics if m in tags], *sorted(t for t in tags if t not in metrics)]
    config = hp.hparams_config_pb(
        hparams=[hp.HParam(key, _domain(search_space[key])) for key in keys],
        metrics=[hp.Metric(tag, dataset_type=hp.Metric.VALIDATION if tag.startswith("val/") else None)
                 for tag in ordered])
    _write_events(building, [(time.time(), 0, config)])
    move_into_place(building, target)
    return target
