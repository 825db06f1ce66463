"""The training plots: like-for-like loss panels, named MoE layers, first/last windows, bounded time bins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raymoe.platform.plots import (
    HEATMAP_FILE,
    LOAD_WINDOW_STEPS,
    LOSS_CURVE_FILE,
    TIMELINE_FILE,
    RunHistory,
    TimeBins,
    layer_name,
    load_windows_figure,
    loss_figure,
    moe_layer_names,
    timeline_figure,
    timeline_layers,
)

N_EXPERTS = 4
NAMES = ["layer 1", "layer 2", "MTP 1"]  # 3 layers, the first dense, one MTP module


def loads_at(step: int) -> np.ndarray:
    """[3 layers, 4 experts]: one hot expert, the next one every LOAD_WINDOW_STEPS steps; from step
    2 * LOAD_WINDOW_STEPS on, less hot (MaxVio 4/1.75 - 1 = 1.29, then 2/1.25 - 1 = 0.60)."""
    loads = np.ones((len(NAMES), N_EXPERTS))
    loads[:, step // LOAD_WINDOW_STEPS % N_EXPERTS] += 3.0 if step < 2 * LOAD_WINDOW_STEPS else 1.0
    return loads


def test_layer_names_name_the_mtp_module() -> None:
    assert moe_layer_names(3, 1, 1) == NAMES
    assert moe_layer_names(4, 0, 0) == ["layer 0", "layer 1", "layer 2", "layer 3"]
    assert layer_name(61, 61) == "MTP 1" and layer_name(62, 61) == "MTP 2"


def test_loss_plot_sets_main_training_loss_against_validation() -> None:
    fig = loss_figure([0, 1, 2], [4.0, 3.5, 3.0], [2], [3.2], total_losses=[5.5, 5.0, 4.5])
    top, bottom = fig.axes
    lines = {line.get_label(): list(line.get_ydata()) for line in top.get_lines()}
    assert lines == {"train (main)": [4.0, 3.5, 3.0], "validation (main)": [3.2]}
    assert [list(line.get_ydata()) for line in bottom.get_lines()] == [[5.5, 5.0, 4.5]]
    assert "MTP" in bottom.get_lines()[0].get_label()
    assert len(loss_figure([0], [4.0], [], []).axes) == 1  # no objective given: one panel


def test_run_history_keeps_main_and_total_losses(tmp_path: Path) -> None:
    history = RunHistory(layer_names=NAMES)
    for step in range(3):
        history.add_step(step, 5.0 - step, loads_at(step), main_loss=4.0 - step)
    assert history.losses == [5.0, 4.0, 3.0] and history.main_losses == [4.0, 3.0, 2.0]
    files = history.write(tmp_path, earlier_main_losses=[(-1, 9.0)])
    assert sorted(f.name for f in files) == sorted([LOSS_CURVE_FILE, HEATMAP_FILE, TIMELINE_FILE])
    same = RunHistory()
    same.add_step(0, 4.0, loads_at(0))  # no MTP term: main = total, the objective panel is left out
    assert same.main_losses == [4.0]


def test_first_and_last_windows() -> None:
    n_steps = 3 * LOAD_WINDOW_STEPS
    history = RunHistory(layer_names=NAMES)
    for step in range(n_steps):
        history.add_step(step, 1.0, loads_at(step))
    (first_title, first), (last_title, last) = history.windows()
    assert first_title == f"first {LOAD_WINDOW_STEPS} steps (0-{LOAD_WINDOW_STEPS - 1})"
    assert last_title == f"last {LOAD_WINDOW_STEPS} steps ({n_steps - LOAD_WINDOW_STEPS}-{n_steps - 1})"
    np.testing.assert_array_equal(first, sum(loads_at(s) for s in range(LOAD_WINDOW_STEPS)))
    np.testing.assert_array_equal(last, sum(loads_at(s) for s in range(n_steps - LOAD_WINDOW_STEPS, n_steps)))
    np.testing.assert_array_equal(history.load_sum_LE, sum(loads_at(s) for s in range(n_steps)))

    short = RunHistory()
    for step in range(5):  # under two windows: two halves that do not overlap
        short.add_step(step, 1.0, loads_at(step))
    assert [title for title, _ in short.windows()] == ["first 2 steps (0-1)", "last 2 steps (3-4)"]

    fig = load_windows_figure(history.windows(), NAMES)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [first_title, last_title]
    labels = [t.get_text() for t in panels[0].get_yticklabels()]
    assert [label.split(" (")[0] for label in labels] == NAMES and labels[-1] == "MTP 1 (MaxVio 1.29)"
    assert [t.get_text() for t in panels[1].get_yticklabels()] == ["MaxVio 0.60"] * len(NAMES)  # its own window's
    unnamed = load_windows_figure([("w", np.ones((3, 2)))], ["too", "few"])  # a wrong count: row numbers
    assert unnamed.axes[0].get_yticklabels()[0].get_text() == "0 (MaxVio 0.00)"


def test_time_bins_stay_bounded_and_keep_every_token() -> None:
    bins = TimeBins(max_bins=4)
    for step in range(10):
        bins.add(step, loads_at(step), np.full((len(NAMES), N_EXPERTS), float(step)))
    starts, loads_TLE, biases_TLE = bins.arrays()
    assert bins.width == 4 and starts == [0, 4, 8]  # 10 steps in bins of 4 (the last one part-filled)
    assert loads_TLE.shape == biases_TLE.shape == (3, len(NAMES), N_EXPERTS)
    np.testing.assert_array_equal(loads_TLE.sum(axis=0), sum(loads_at(s) for s in range(10)))
    assert biases_TLE[:, 0, 0].tolist() == [3.0, 7.0, 9.0]  # each bin's last step
    no_bias = TimeBins()
    no_bias.add(0, loads_at(0), None)
    assert no_bias.arrays()[2] is None


def test_timeline_names_every_layer_and_draws_load_and_bias() -> None:
    steps, loads_TLE = [0, 1, 2], np.stack([loads_at(s) for s in range(3)])
    fig = timeline_figure(steps, loads_TLE, np.zeros_like(loads_TLE), NAMES, last_step=2)
    images = [ax for ax in fig.axes if ax.get_images()]
    assert len(images) == 2 * len(NAMES)  # a load and a bias panel per layer
    assert [ax.get_ylabel().split("\n")[0] for ax in images[::2]] == NAMES
    assert images[0].get_images()[0].get_array().shape == (N_EXPERTS, len(steps))  # experts × time
    assert len([ax for ax in timeline_figure(steps, loads_TLE, None, NAMES).axes if ax.get_images()]) == len(NAMES)
    assert timeline_layers(4) == [0, 1, 2, 3] and timeline_layers(62, 16)[-1] == 61
    assert len(timeline_layers(62, 16)) == 16
    with pytest.raises(ValueError, match="len\\(steps\\)=2"):
        timeline_figure([0, 1], loads_TLE, None)
