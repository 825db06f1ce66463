"""What ``raymoe serve --checkpoint models:/NAME/VERSION`` opens: the checkpoint that version was registered with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_run import write_tiny_run

from raymoe.platform.checkpoint.layout import latest_checkpoint
from raymoe.platform.config import TrackingConfig
from raymoe.platform.inference.loading import open_served
from raymoe.platform.tracking import Tracker


def test_open_served_reads_a_model_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = latest_checkpoint(str(write_tiny_run(tmp_path, steps=1)))
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = Tracker(TrackingConfig(uri=uri, experiment="serve"), register_as="served")
    tracker.log_metrics({"loss": 1.0}, 0)
    assert tracker.finish(checkpoint=checkpoint).model_version == "models:/served/1"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    for given in ("models:/served/1", os.path.abspath("models:/served/1")):  # serve makes the argument absolute
        served = open_served(given)
        assert served.location == checkpoint and served.tokenizer is not None
