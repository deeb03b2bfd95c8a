"""How many trials run at once: what the cluster holds, never more (ENVIRONMENT.md's stall)."""

from __future__ import annotations

import pytest

from tl_ray.config import parse_config
from tl_ray.errors import ConfigError
from tl_ray.search.tune import max_concurrent_trials


def cfg(**train):
    search = train.pop("search", {})
    return parse_config({"data": {"path": "x.csv"}, "train": train, "search": {"trials": 16, **search}})


@pytest.mark.parametrize(
    "train, resources, expected",
    [
        ({"num_workers": 1}, {"CPU": 2.0}, 2),
        ({"num_workers": 2}, {"CPU": 4.0}, 2),
        ({"num_workers": 2, "cpus_per_worker": 2}, {"CPU": 9.0}, 2),
        ({"num_workers": 2, "use_gpu": True}, {"CPU": 64.0, "GPU": 8.0}, 4),
        ({"num_workers": 1, "search": {"max_concurrent_trials": 3}}, {"CPU": 16.0}, 3),
        ({"num_workers": 1, "search": {"trials": 2}}, {"CPU": 16.0}, 2),
    ],
)
def test_cap_is_what_the_cluster_holds(train, resources, expected):
    assert max_concurrent_trials(cfg(**train), resources) == expected


def test_a_trial_larger_than_the_cluster_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot hold one trial"):
        max_concurrent_trials(cfg(num_workers=4), {"CPU": 2.0})
    with pytest.raises(ConfigError, match="GPU"):
        max_concurrent_trials(cfg(num_workers=1, use_gpu=True), {"CPU": 8.0})
