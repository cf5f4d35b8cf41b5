"""Progress in a log file: plain lines at most every 30 s, no carriage returns; on a terminal, tqdm's bar.

    python -m pytest -q tests/test_progress.py
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import pytest

from core.data.demo_data import generate_demo
from core.progress import LoggedProgress, progress_bar
from tests.paths import REPO


class FakeClock:
    """tqdm's clock (tqdm.std.time), moved on by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("tqdm.std.time", fake)
    return fake


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "core.progress"]


def test_in_a_file_a_line_at_most_every_30_s_and_one_at_the_end(clock: FakeClock,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="core.progress"):  # whatever an earlier test set on "core"
        bar = progress_bar(total=100, desc="epoch 1/2", unit="step", stream=io.StringIO())
        assert isinstance(bar, LoggedProgress)
        for _ in range(100):
            clock.now += 1.0
            bar.update(1)
        bar.set_postfix(loss="0.5")
        bar.close()
    lines = progress_lines(caplog)
    assert len(lines) == 4, lines  # after 30, 60 and 90 s, and the end
    assert lines[0].startswith("epoch 1/2: 30/100 step (30%) after 00:30, 01:10 left")
    assert lines[-1].startswith("epoch 1/2: 100/100 step (100%) after 01:40") and lines[-1].endswith("loss=0.5")


def test_a_short_step_in_a_file_adds_no_line(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="core.progress"):  # whatever an earlier test set on "core"
        for _ in progress_bar(range(50), desc="decoding", unit="img", stream=io.StringIO()):
            clock.now += 0.5
    assert progress_lines(caplog) == []


def test_on_a_terminal_the_bar_and_disabled_nothing(caplog: pytest.LogCaptureFixture) -> None:
    terminal = Terminal()
    with caplog.at_level(logging.INFO, logger="core.progress"):  # whatever an earlier test set on "core"
        with progress_bar(total=3, desc="epoch 1/1", unit="step", stream=terminal) as bar:
            bar.update(3)
        with progress_bar(total=3, desc="off", enabled=False) as bar:
            bar.update(3)
    assert "\r" in terminal.getvalue() and "3/3" in terminal.getvalue()
    assert progress_lines(caplog) == []


def test_a_training_command_logged_to_a_file_has_no_carriage_returns(tmp_path) -> None:
    """The issue's case, ``python -m core.train ... > log 2>&1``: a few lines per epoch, none a bar's update."""
    data = generate_demo(tmp_path / "data", n_lesions=24, image_size=16, seed=0)
    log = tmp_path / "train.log"
    epochs = 2
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # the suite's setting hid every bar
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, "-m", "core.train", "--data", str(data), "--out", str(tmp_path / "run"),
                               "--set", "image_size=16", "--set", f"epochs={epochs}", "--set", "pretrained=none",
                               "--set", "batch_size=8"], cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                              timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    assert "\r" not in text and "decoding" in text
    # the set-up's few lines, then per epoch its logged line and at most a line per 30 s of it (none here)
    assert text.count("INFO core.training.run_writer: epoch ") == epochs and len(text.splitlines()) <= 6 + 2 * epochs, text
