"""datahall.core.config: YAML/JSON validated by any pydantic model, errors at their line."""

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from datahall.core.config import (
    ConfigError,
    ConfigIssue,
    compose_yaml,
    did_you_mean,
    issues_from_validation_error,
    load_yaml_model,
    locate,
    model_at,
    parse_yaml_model,
    yaml_path,
)


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_paths: int = 100
    time_s: float = 1.0


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    when_: str | None = Field(None, alias="when")

    @field_validator("name")
    @classmethod
    def _lower(cls, v: str) -> str:
        if v != v.lower():
            raise ValueError(f"name must be lower case (got {v!r})")
        return v


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limits: Limits = Limits()
    items: list[Item] = []
    named: dict[str, Limits] = {}


def errors(text: str, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_yaml_model(text, Settings, source="s.yaml", **kw)
    return str(e.value).splitlines()


def test_valid_text_and_file(tmp_path: Path):
    s = parse_yaml_model("limits: {max_paths: 5}\nitems: [{name: a, when: x}]\n", Settings)
    assert s.limits.max_paths == 5 and s.items[0].when_ == "x"
    f = tmp_path / "s.yaml"
    f.write_text("named:\n  a: {time_s: 2}\n")
    assert load_yaml_model(f, Settings).named["a"].time_s == 2.0
    assert load_yaml_model(str(f), Settings).named["a"].time_s == 2.0
    assert load_yaml_model("", Settings) == Settings()
    with pytest.raises(ConfigError, match="long:1: the file must be a mapping"):
        load_yaml_model("x" * 5000, Limits, source="long")  # too long for a file name: text


def test_unknown_key_did_you_mean_at_its_line():
    assert errors("limits:\n  max_path: 3\n") == [
        "s.yaml:2: limits.max_path: unknown field 'max_path' (did you mean 'max_paths'?); "
        "allowed: max_paths, time_s"
    ]


def test_aliases_are_the_names_shown():
    assert errors("items:\n  - name: a\n    whn: b\n") == [
        "s.yaml:3: items[0].whn: unknown field 'whn' (did you mean 'when'?); allowed: name, when"
    ]


def test_validator_messages_types_and_missing_in_line_order():
    lines = errors("items:\n  - name: A\n  - when: b\nlimits:\n  max_paths: lots\n")
    assert lines[0] == "s.yaml:2: items[0].name: name must be lower case (got 'A')"
    assert lines[1] == "s.yaml:3: items[1].name: required, but missing"
    assert lines[2].startswith("s.yaml:5: limits.max_paths: Input should be a valid integer")
    assert lines[2].endswith("(got 'lots')")


def test_hints_replace_the_did_you_mean():
    assert errors("limits: {max_states: 3}\n", hints={"max_states": "use max_paths"}) == [
        "s.yaml:1: limits.max_states: unknown field 'max_states': use max_paths"
    ]


def test_json_gets_lines_too():
    text = '{\n  "limits": {\n    "max_paths": 1,\n    "tim_s": 2\n  }\n}'
    assert errors(text)[0].startswith("s.yaml:4: limits.tim_s: unknown field 'tim_s'")


def test_syntax_errors_duplicates_and_non_mappings():
    assert errors("limits: [1,\n")[0].startswith("s.yaml:2: not valid YAML:")
    assert errors("limits: {}\nlimits: {}\n") == [
        "s.yaml:2: limits: duplicate key (first at line 1)"
    ]
    assert errors("- a\n") == ["s.yaml:1: the file must be a mapping of settings"]


def test_missing_file_and_cross_checks(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        load_yaml_model(tmp_path / "nope.yaml", Settings)

    def problems(s: Settings):
        return [(("named", k, "time_s"), "too slow") for k, v in s.named.items() if v.time_s > 9]

    assert errors("named:\n  a:\n    time_s: 10\n", problems=problems) == [
        "s.yaml:3: named.a.time_s: too slow"
    ]


def test_error_subclass_and_building_blocks():
    class MyError(ConfigError):
        default_source = "mine.yaml"

    with pytest.raises(MyError) as e:
        parse_yaml_model("limits: 3", Settings, error=MyError)
    assert str(e.value).startswith("mine.yaml:1: limits:")
    assert str(ConfigError([ConfigIssue(0, "", "bad")])) == "config.yaml: bad"
    root, data = compose_yaml("a:\n  - b: 1\n")
    assert data == {"a": [{"b": 1}]} and locate(root, ("a", 0, "b")) == (2, ["a", 0, "b"])
    assert yaml_path(["a", 0, "x y"]) == "a[0]['x y']" and did_you_mean("nme", ["name"])
    assert model_at(Settings, ["named", "k"]) is Limits and model_at(Settings, ["nope"]) is None
    try:
        Settings.model_validate({"limits": {"max_paths": "x"}})
    except Exception as err:  # noqa: BLE001
        (issue,) = issues_from_validation_error(err, None, Settings)
        assert issue.path == "limits.max_paths"
