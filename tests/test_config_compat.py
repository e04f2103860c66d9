"""Campaigns started by an earlier ionflow still resume: the science hash of an unchanged file
must not change when settings that used to be fixed numbers become configurable."""

from __future__ import annotations

import pytest

from ionflow.config import CampaignConfig

H3O = {"symbols": ["O", "H", "H", "H"], "positions": [[0, 0, 0], [0.97, 0, 0], [-0.3, 0.92, 0], [-0.3, -0.46, 0.8]]}

# science_hash() of these files as computed by ionflow before the restructure (commit 0bbaf51)
EARLIER = [
    ({}, "d1234b81d9b685b959668a7c50e2062500f4f4f5100e1f6656bf00bc253f8d0f"),
    (
        {"model": {"uncertainty": "shallow"}, "reference": {"adapter": "tblite"}},
        "f4c3d8a1721dde1a870fd31720cbb4f1de2e42664fbd0464f6ba60828e181731",
    ),
]


@pytest.mark.parametrize(("extra", "expected"), EARLIER)
def test_science_hash_of_earlier_files_is_unchanged(extra, expected):
    cfg = CampaignConfig.model_validate({"name": "h3o", "system": {"structure": H3O, "charge": 1}, **extra})
    assert cfg.science_hash() == expected


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("explore", "start_rattle_stdev", 0.05),
        ("training", "finetune_lr_factor", 0.25),
        ("training", "nll_weight", 2.0),
        ("selection", "strategy", "diverse"),
        ("selection", "min_novelty", 0.5),
    ],
)
def test_a_changed_new_setting_changes_the_science(section, key, value):
    base = {"name": "h3o", "system": {"structure": H3O, "charge": 1}}
    changed = CampaignConfig.model_validate({**base, section: {key: value}})
    assert changed.science_hash() != CampaignConfig.model_validate(base).science_hash()
