"""YAML (or JSON) files validated by a pydantic model, with errors that point at the line.

Any system that reads a configuration or policy file uses this module: it parses the text twice,
once into plain data for pydantic and once into the node tree of ``yaml.compose``, and maps each
pydantic error location (``("backends", 1, "url")``) back to the line of the node it names. Every
problem becomes one :class:`ConfigIssue`; :class:`ConfigError` prints one line per problem, e.g.
``policy.yaml:4: helpers.deny[0]: unknown helper 'probe_writ_user' (did you mean ...?)``.
Unknown keys (``extra="forbid"``) are reported with a did-you-mean among the section's fields.

JSON is a subset of YAML's flow style, so a JSON file gets line numbers the same way.

>>> from pydantic import BaseModel, ConfigDict
>>> class Limits(BaseModel):
...     model_config = ConfigDict(extra="forbid")
...     max_paths: int = 100
>>> class Settings(BaseModel):
...     model_config = ConfigDict(extra="forbid")
...     name: str
...     limits: Limits = Limits()
>>> load_yaml_model("name: a\\nlimits:\\n  max_path: 3\\n", Settings, source="s.yaml")
Traceback (most recent call last):
...
datahall.core.config.ConfigError: s.yaml:3: limits.max_path: unknown field 'max_path' (did you mean 'max_paths'?); allowed: max_paths
"""

import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

import yaml
from pydantic import BaseModel, ValidationError

__all__ = [
    "DEFER_CROSS_CHECKS",
    "ConfigError",
    "ConfigIssue",
    "compose_yaml",
    "did_you_mean",
    "issue_message",
    "issues_from_validation_error",
    "load_yaml_model",
    "locate",
    "names_a_file",
    "model_at",
    "parse_yaml_model",
    "read_text",
    "validate_at_lines",
    "yaml_path",
]

M = TypeVar("M", bound=BaseModel)
Loc = Sequence[str | int]

DEFER_CROSS_CHECKS = "datahall.defer_cross_checks"
"""Validation-context flag: a model's cross-field checks are deferred to the loader, which reports
each at its own line (see ``problems`` in :func:`parse_yaml_model`)."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem: the YAML line (1-based; 0 if unknown), the setting's path, and what is wrong."""

    line: int
    path: str
    message: str


class ConfigError(ValueError):
    """A file that cannot be used; one line per problem, sorted by line:
    ``config.yaml:12: backends[1].url: must be an http:// or https:// URL ...``.

    >>> print(ConfigError([ConfigIssue(3, "a.b", "bad"), ConfigIssue(0, "", "no such file")], "x.yaml"))
    x.yaml: no such file
    x.yaml:3: a.b: bad
    """

    default_source = "config.yaml"

    def __init__(self, issues: Sequence[ConfigIssue], source: str | None = None) -> None:
        self.issues = sorted(issues, key=lambda i: i.line)
        self.source = self.default_source if source is None else source
        super().__init__("\n".join(self._line(i) for i in self.issues))

    def _line(self, issue: ConfigIssue) -> str:
        where = f"{self.source}:{issue.line}" if issue.line else self.source
        return (
            f"{where}: {issue.path}: {issue.message}" if issue.path else f"{where}: {issue.message}"
        )


def yaml_path(loc: Loc) -> str:
    """A location as a reader writes it.

    >>> yaml_path(["backends", 1, "url"]), yaml_path(["maps", "*", "read"])
    ('backends[1].url', "maps['*'].read")
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][\w.-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{part!r}]"
    return out


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of `choices`, or ``""``.

    >>> did_you_mean("reed", ["read", "write"]), did_you_mean("zzz", ["read"])
    (" (did you mean 'read'?)", '')
    """
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _child(node: yaml.Node | None, part: str | int) -> tuple[yaml.Node, yaml.Node] | None:
    """(the node to report, the value node) for `part` under `node`, following merge keys."""
    if isinstance(node, yaml.MappingNode):
        merged = []
        for key, value in node.value:
            if key.tag == "tag:yaml.org,2002:merge":
                merged += value.value if isinstance(value, yaml.SequenceNode) else [value]
            elif isinstance(key, yaml.ScalarNode) and key.value == str(part):
                # a scalar's error is on its own line; a section's on its key's line
                return (value if isinstance(value, yaml.ScalarNode) else key), value
        for m in merged:
            found = _child(m, part)
            if found:
                return found
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part], node.value[part]
    return None


def locate(root: yaml.Node | None, loc: Loc) -> tuple[int, list[str | int]]:
    """The line for an error at `loc`, and the part of `loc` that names settings: elements
    pydantic adds for unions or function validators, which the YAML lacks, are skipped; the
    last element is kept even when missing (a required field, an unknown key).

    >>> root = yaml.compose("a:\\n  b: [1, 2]\\n")
    >>> locate(root, ("a", "b", 1)), locate(root, ("a", "c"))
    ((2, ['a', 'b', 1]), (1, ['a', 'c']))
    """
    if root is None:  # no YAML to follow (data built in Python): every named part is shown
        return 1, [part for part in loc if not _is_internal(part)]
    line = _line(root)
    node, shown = root, []
    for k, part in enumerate(loc):
        found = _child(node, part)
        if found is None:
            if k == len(loc) - 1 and not _is_internal(part):
                shown.append(part)
            continue
        report, node = found
        line = _line(report)
        shown.append(part)
    return line, shown


def _is_internal(part: str | int) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("function-after", "function-before"))


def _strip_optional(t: Any) -> Any:
    if typing.get_origin(t) in (Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    if typing.get_origin(t) is Annotated:
        return _strip_optional(typing.get_args(t)[0])
    return t


def _field_names(model: type[BaseModel]) -> dict[str, str]:
    """The names a file uses for `model`'s fields (the alias where one is set) → field names."""
    return {(f.alias or name): name for name, f in model.model_fields.items()}


def model_at(root_model: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The section class at `loc` under `root_model` (to list its fields when a key is unknown).

    >>> from pydantic import BaseModel
    >>> class Inner(BaseModel):
    ...     x: int = 0
    >>> class Outer(BaseModel):
    ...     items: list[Inner] = []
    ...     named: dict[str, Inner] = {}
    >>> model_at(Outer, ["items", 0]).__name__, model_at(Outer, ["named", "k"]).__name__
    ('Inner', 'Inner')
    """
    t: Any = root_model
    for part in loc:
        t = _strip_optional(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            name = _field_names(t).get(str(part))
            if name is None:
                return None
            t = t.model_fields[name].annotation
        elif typing.get_origin(t) is list and isinstance(part, int):
            t = typing.get_args(t)[0]
        elif typing.get_origin(t) is dict:
            t = typing.get_args(t)[1]
        else:
            return None
    t = _strip_optional(t)
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def issue_message(
    error: Mapping[str, Any],
    shown: Loc,
    root_model: type[BaseModel],
    hints: Mapping[str, str] | None = None,
) -> str:
    """The message for one pydantic `error` whose settings path is `shown`: unknown keys get a
    did-you-mean and the allowed fields (or ``hints[name]`` for a known misnomer), missing ones
    ``required, but missing``, validator messages lose pydantic's ``Value error,`` prefix, and
    type errors show the value given.
    """
    kind, msg, value = error["type"], error["msg"], error.get("input")
    if kind == "extra_forbidden":
        name = str(shown[-1]) if shown else "?"
        if hints and name in hints:
            return f"unknown field {name!r}: {hints[name]}"
        model = model_at(root_model, shown[:-1])
        allowed = list(_field_names(model)) if model else []
        return f"unknown field {name!r}{did_you_mean(name, allowed)}" + (
            f"; allowed: {', '.join(allowed)}" if allowed else ""
        )
    if kind == "missing":
        return "required, but missing"
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    if isinstance(value, str | int | float | bool) or value is None:
        msg += f" (got {value!r})"
    return msg


def issues_from_validation_error(
    err: ValidationError,
    root: yaml.Node | None,
    root_model: type[BaseModel],
    hints: Mapping[str, str] | None = None,
) -> list[ConfigIssue]:
    """One :class:`ConfigIssue` per error of `err`, at the line of `root`'s node it names."""
    issues = []
    for error in err.errors():
        line, shown = locate(root, error["loc"])
        issues.append(
            ConfigIssue(line, yaml_path(shown), issue_message(error, shown, root_model, hints))
        )
    return issues


def _duplicate_keys(node: yaml.Node | None, issues: list[ConfigIssue], path: list) -> None:
    # PyYAML keeps the last of two equal keys silently; a config must not
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in first:
                    issues.append(
                        ConfigIssue(
                            _line(key),
                            yaml_path([*path, key.value]),
                            f"duplicate key (first at line {first[key.value]})",
                        )
                    )
                first.setdefault(key.value, _line(key))
                _duplicate_keys(value, issues, [*path, key.value])
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, issues, [*path, i])


def compose_yaml(
    text: str, source: str | None = None, error: type[ConfigError] = ConfigError
) -> tuple[yaml.Node | None, Any]:
    """(the node tree, the plain data) of YAML `text`; raises `error` for a syntax error or a
    duplicate key, at its line.

    >>> compose_yaml("a: 1\\na: 2\\n", "x.yaml")
    Traceback (most recent call last):
    ...
    datahall.core.config.ConfigError: x.yaml:2: a: duplicate key (first at line 1)
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise error([ConfigIssue(line, "", f"not valid YAML: {problem}")], source) from None
    issues: list[ConfigIssue] = []
    _duplicate_keys(root, issues, [])
    if issues:
        raise error(issues, source)
    return root, data


def parse_yaml_model(
    text: str,
    model: type[M],
    *,
    source: str | None = None,
    hints: Mapping[str, str] | None = None,
    error: type[ConfigError] = ConfigError,
    problems: Callable[[M], Iterable[tuple[Loc, str]]] | None = None,
) -> M:
    """Validate YAML or JSON `text` as `model`; `error` lists each problem at its line.

    `problems`, when given, runs on the validated model (validated with the context flag
    :data:`DEFER_CROSS_CHECKS` set) and returns cross-field problems as ``(loc, message)``, each
    reported at the line of `loc`. `hints` maps a misnamed key to advice.
    """
    root, data = compose_yaml(text, source, error)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise error([ConfigIssue(1, "", "the file must be a mapping of settings")], source)
    return validate_at_lines(
        data, root, model, source=source, hints=hints, error=error, problems=problems
    )


def validate_at_lines(
    data: Any,
    root: yaml.Node | None,
    model: type[M],
    *,
    source: str | None = None,
    hints: Mapping[str, str] | None = None,
    error: type[ConfigError] = ConfigError,
    problems: Callable[[M], Iterable[tuple[Loc, str]]] | None = None,
) -> M:
    """Validate plain `data` (parsed from the YAML node tree `root`) as `model`; errors at lines."""
    context = {DEFER_CROSS_CHECKS: True} if problems else None
    try:
        value = model.model_validate(data, context=context)
    except ValidationError as e:
        raise error(issues_from_validation_error(e, root, model, hints), source) from None
    issues = []
    for loc, message in problems(value) if problems else ():
        line, shown = locate(root, loc)
        issues.append(ConfigIssue(line, yaml_path(shown), message))
    if issues:
        raise error(issues, source)
    return value


def read_text(path: str | os.PathLike[str], error: type[ConfigError] = ConfigError) -> str:
    """The text of `path`; a missing or unreadable file is an `error` naming it."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error([ConfigIssue(0, "", "no such file")], str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise error([ConfigIssue(0, "", f"cannot be read: {e}")], str(p)) from None


def names_a_file(text_or_path: str | os.PathLike[str]) -> bool:
    """Whether `text_or_path` is a path (a :class:`~os.PathLike`, or a one-line string naming
    an existing file) rather than the text itself.

    >>> names_a_file("max_paths: 7"), names_a_file(Path("missing.yaml"))
    (False, True)
    """
    if isinstance(text_or_path, os.PathLike):
        return True
    if "\n" in text_or_path or not text_or_path.strip():
        return False
    try:
        return Path(text_or_path).is_file()
    except (OSError, ValueError):  # too long a name, a NUL byte: text, not a path
        return False


def load_yaml_model(
    text_or_path: str | os.PathLike[str],
    model: type[M],
    *,
    source: str | None = None,
    **options: Any,
) -> M:
    """Read a file (a :class:`~pathlib.Path`, or a string naming an existing file without a
    newline) or take YAML/JSON text, and validate it as `model` (see :func:`parse_yaml_model`).

    >>> from pydantic import BaseModel
    >>> class Budget(BaseModel):
    ...     max_paths: int = 100
    >>> load_yaml_model("max_paths: 7", Budget).max_paths
    7
    """
    error = options.get("error", ConfigError)
    if names_a_file(text_or_path):
        text = read_text(text_or_path, error)
        return parse_yaml_model(text, model, source=source or str(text_or_path), **options)
    return parse_yaml_model(str(text_or_path), model, source=source, **options)
