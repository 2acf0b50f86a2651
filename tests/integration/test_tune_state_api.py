"""`chatforge tune` refuses a Ray without its state API, on which freeing a stopped trial's workers depends."""

from __future__ import annotations

import pytest

from chatforge.config import load_spec
from chatforge.tune.search import StateApiMissing, run_search

pytestmark = pytest.mark.integration


def test_a_search_on_ray_without_the_dashboard_stops_before_any_trial_and_says_why(ray_local, tmp_path):
    spec = load_spec("pipelines/tune.yaml", [f"tune.output={tmp_path / 'out'}", "tracking.enabled=false"])
    with pytest.raises(StateApiMissing, match="start Ray with its dashboard"):
        run_search(spec)
    assert not (tmp_path / "out" / "search").exists()
