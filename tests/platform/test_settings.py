"""Typed settings: the campaign file's sections and the platform's settings hold the same fields."""

from __future__ import annotations

import dataclasses

import pytest

from ionflow.config import ModelConfig, TrainingConfig
from ionflow.platform.model import ModelSpec
from ionflow.platform.settings import ModelSettings, TrainingSettings


@pytest.mark.parametrize(("config", "settings"), [(ModelConfig, ModelSettings), (TrainingConfig, TrainingSettings)])
def test_config_sections_and_settings_have_the_same_fields(config, settings):
    # in the same order: a model file stores ModelSettings as the dict ModelConfig.hyper() is
    campaign_only = getattr(config, "CAMPAIGN_ONLY", ())
    assert [f for f in config.model_fields if f not in campaign_only] == [f.name for f in dataclasses.fields(settings)]
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(settings)), "defaults live in config"
    assert config().settings() == settings(**config().model_dump(exclude=set(campaign_only)))


def test_settings_are_the_configs_values():
    model = ModelConfig(uncertainty="shallow", electrostatics="none", r_max=3.5).settings()
    assert model.shallow and not model.has_electrostatics and model.r_max == 3.5
    training = TrainingConfig(finetune_lr_factor=0.25, nll_weight=0.0).settings()
    assert training.finetune_lr_factor == 0.25 and training.nll_weight == 0.0
    assert TrainingConfig().settings().finetune_lr_factor == 0.5 and TrainingConfig().settings().nll_weight == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        training.epochs = 1


def test_a_spec_reads_its_hyper_parameters_typed():
    model = ModelConfig(ensemble_size=4, dtype="float32").settings()
    spec = ModelSpec(hyper=dataclasses.asdict(model), z_table=[1, 8], atomic_energies=[0.0, 0.0])
    assert spec.settings == model
    assert spec.hyper == ModelConfig(ensemble_size=4, dtype="float32").hyper()
