"""SimConfig is the one place a run's names and defaults are defined: the CLI reads them from it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from mfllm.cli import app
from mfllm.errors import ConfigError
from mfllm.prompts.templates import LANGS
from mfllm.simulation.config import SimConfig, choices, default
from mfllm.simulation.meanfield import make_meanfield
from mfllm.simulation.methods import METHODS
from mfllm.simulation.runner import check_config


def test_literal_names_match_the_registries():
    assert choices("method") == tuple(METHODS)
    assert choices("lang") == LANGS
    assert choices("meanfield") == ("stats", "stats-compact", "stats-compact8", "llm")
    assert make_meanfield("stats-compact").name == "stats-compact"


@pytest.mark.parametrize("field", ["method", "meanfield", "lang"])
def test_a_wrong_name_fails_when_the_config_is_built(field):
    with pytest.raises(ValidationError):
        SimConfig(**{field: "bogus"})
    c = SimConfig()
    with pytest.raises(ValidationError):  # assignment is checked too
        setattr(c, field, "bogus")
    with pytest.raises(ConfigError) as e:  # a config built without checks is caught before a run starts
        check_config(SimConfig.model_construct(**{field: "bogus"}))
    assert e.value.field == field and "choose one of" in str(e.value)


def test_cli_defaults_and_choices_come_from_simconfig():
    cmd = next(c for c in app.registered_commands if c.name == "simulate" or
               getattr(c.callback, "__name__", "") == "simulate")
    import inspect

    params = inspect.signature(cmd.callback).parameters
    cli_to_field = {"max_agents": "max_rollout_agents"}
    checked = 0
    for name, p in params.items():
        field = cli_to_field.get(name, name)
        if field in SimConfig.model_fields and not field.endswith("_adapter"):
            assert p.default.default == default(field), name
            checked += 1
    assert checked >= 12
    out = CliRunner().invoke(app, ["simulate", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).stdout
    assert "mf | state | recent | popular" in out and "stats | stats-compact | stats-compact8 | llm" in out and "zh | en" in out
