"""The default model's first-run conversion (GGUF to a transformers directory)
says its progress as it goes: most of its half minute goes where transformers
shows no bar. A second run finds it cached and converts nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from workers.models import _converted_default


def test_the_first_run_conversion_says_each_step_and_the_second_run_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="workers.models")
    directory, revision = _converted_default(tmp_path)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("converting")]
    steps = [line.split("] ")[0] for line in said if "] " in line]
    assert steps == ["converting: [1/3", "converting: [2/3", "converting: [3/3"], said
    assert said[0].startswith("converting SmolLM2") and "once" in said[0]
    assert said[-1].startswith("converting: done (the step before took")
    assert (directory / "config.json").is_file()

    caplog.clear()
    assert _converted_default(tmp_path) == (directory, revision)
    assert not [r for r in caplog.records if r.getMessage().startswith("converting")]
