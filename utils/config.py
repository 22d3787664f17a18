"""The one config loader used by every script: YAML file + ``KEY=VALUE`` overrides, validated
against a schema before any work starts.

A schema is a dict ``key → default``; the default's type is the expected type (an int is
accepted for a float, ``None`` accepts anything, a non-empty dict is validated recursively and
an empty dict accepts any mapping). :class:`Spec` states what a default cannot: a required key,
allowed values, several allowed types. :class:`Dynamic` computes a section's schema from the
rest of the config (e.g. ``model_config`` from the class named by ``model``).
Every error names the file and line (or the override) and what was expected, and lists the
closest valid key for a misspelt one.
"""
from __future__ import annotations

import copy
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from utils.errors import SCFeatError

REQUIRED = object()

log = logging.getLogger("scfeat.config")


@dataclass
class Spec:
    """Validation rule for one key: ``default`` (or :data:`REQUIRED`), allowed ``types`` (a
    tuple; default: the default's type), allowed ``choices`` (the error adds ``doc``), the range
    ``minimum`` ≤ value ≤ ``maximum`` and ``above`` < value (numbers; ``None`` passes), and
    ``check(value) -> problem or None`` for any other single-key rule. ``inert``: a key that the
    original's configs carry but that has no effect here; it is accepted, and reported once at
    start-up when a config sets it."""

    default: Any = REQUIRED
    types: tuple = ()
    choices: tuple = ()
    doc: str = ""
    inert: bool = False
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    check: Callable[[Any], str | None] | None = None


@dataclass
class Dynamic:
    """A section whose schema depends on the config: ``schema_of(config, section) -> dict``,
    ``config`` the validated top-level values, ``section`` the raw values of this section."""

    schema_of: Callable[[dict, dict], dict]
    default: Any = field(default_factory=dict)


TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
              list: "a list", dict: "a mapping", type(None): "null"}


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key (dotted path → line)."""


def _key_lines(node: yaml.Node, prefix: str = "", out: dict | None = None) -> dict[str, int]:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = f"{prefix}{key_node.value}"
            out[path] = key_node.start_mark.line + 1
            _key_lines(value_node, path + ".", out)
    return out


def read_yaml(path: str | Path) -> dict:
    """Parse a YAML mapping; a clear error naming the file and line when it is not one."""
    conf, _ = _read_yaml_with_lines(path)
    return conf


def _read_yaml_with_lines(path: str | Path) -> tuple[dict, dict[str, int]]:
    path = Path(path)
    if not path.is_file():
        raise SCFeatError(f"config file '{path}' does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise SCFeatError(f"{path}:{line}: not UTF-8 text (expected a YAML file)") from None
    node = None
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        conf = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SCFeatError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except _YAML_VALUE_ERRORS as exc:
        line = _failing_scalar_line(node)
        where = f"{path}:{line}" if line else str(path)
        raise SCFeatError(f"{where}: not valid YAML ({_yaml_value_problem(exc)})") from None
    if conf is None:
        conf = {}
    if not isinstance(conf, dict):
        raise SCFeatError(f"{path}: expected a mapping of config keys, got {type(conf).__name__}")
    return conf, _key_lines(node) if node is not None else {}


# PyYAML lets these escape: a value its resolver accepts but Python rejects (a date such as
# 2001-02-30 → ValueError) and nesting deeper than the recursion limit (RecursionError).
_YAML_VALUE_ERRORS = (ValueError, OverflowError, RecursionError)


def _yaml_value_problem(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return f"a value cannot be converted: {exc}"


def _failing_scalar_line(node: yaml.Node | None) -> int | None:
    """1-based line of the first scalar of ``node`` that SafeLoader cannot construct."""
    stack = [node] if node is not None else []
    seen = set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, yaml.ScalarNode):
            try:
                yaml.SafeLoader("").construct_object(current)
            except _YAML_VALUE_ERRORS + (yaml.YAMLError,):
                return current.start_mark.line + 1
        elif isinstance(current, yaml.MappingNode):
            stack.extend(n for pair in reversed(current.value) for n in reversed(pair))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend(reversed(current.value))
    return None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'a.b=VALUE'`` → ``(['a', 'b'], yaml-parsed VALUE)``."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SCFeatError(f"override '{item}': expected KEY=VALUE with a dotted KEY, "
                          f"e.g. epoch=1 or data_config_train.data_path=/data/megadepth")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise SCFeatError(f"override '{item}': value is not valid YAML "
                          f"({getattr(exc, 'problem', exc)})") from None
    except _YAML_VALUE_ERRORS as exc:
        raise SCFeatError(f"override '{item}': value is not valid YAML "
                          f"({_yaml_value_problem(exc)})") from None
    return key.split("."), value


def apply_overrides(conf: dict, overrides: list[str]) -> dict[str, str]:
    """Set each dotted override in ``conf`` (in place); returns dotted key → source text."""
    sources = {}
    for item in overrides:
        keys, value = parse_override(item)
        node = conf
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if is_none_word(child):  # absent, null or the original's bare None: a new mapping
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise SCFeatError(f"override '{item}': '{'.'.join(keys[:depth + 1])}' is not a "
                                  f"mapping, cannot set a key inside it")
            node = child
        node[keys[-1]] = value
        sources[".".join(keys)] = f"command-line override '{item}'"
    return sources


class _Validator:
    def __init__(self, origin: str, lines: dict[str, int], sources: dict[str, str]):
        self.origin, self.lines, self.sources = origin, lines, sources
        self.inert_keys: list[str] = []  # inert keys the config sets (dotted paths)

    def where(self, path: str) -> str:
        if path in self.sources:
            return self.sources[path]
        # Closest ancestor with a known line.
        parts = path.split(".")
        for end in range(len(parts), 0, -1):
            line = self.lines.get(".".join(parts[:end]))
            if line is not None:
                return f"{self.origin}:{line}"
        return self.origin

    def fail(self, path: str, message: str) -> None:
        raise SCFeatError(f"{self.where(path)}: key '{path}' {message}")

    def section(self, values: Any, schema: dict, path: str, root: dict) -> dict:
        if values is None:
            values = {}
        if not isinstance(values, dict):
            self.fail(path, f"must be a mapping, got {_describe(values)}")
        out = {}
        for key, value in values.items():
            sub = f"{path}.{key}" if path else str(key)
            if key not in schema:
                close = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else \
                    f"; valid keys: {', '.join(map(str, schema))}"
                self.fail(sub, f"is not a known key{hint}")
            out[key] = self.value(value, schema[key], sub, root)
            if isinstance(schema[key], Spec) and schema[key].inert and sub not in self.inert_keys:
                self.inert_keys.append(sub)
        for key, rule in schema.items():
            if key in out:
                continue
            sub = f"{path}.{key}" if path else str(key)
            default = rule.default if isinstance(rule, (Spec, Dynamic)) else rule
            if default is REQUIRED:
                raise SCFeatError(f"{self.origin}: required key '{sub}' is missing")
            if isinstance(rule, Dynamic) or (isinstance(rule, dict) and rule):
                # Sub-sections fill their own defaults (a schema may hold Specs).
                out[key] = self.value(copy.deepcopy(default) if isinstance(rule, Dynamic) else {},
                                      rule, sub, root)
            else:
                out[key] = copy.deepcopy(default)
        return out

    def check_range(self, value: Any, rule: Spec, path: str) -> None:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if rule.minimum is not None and value < rule.minimum:
            self.fail(path, f"must be at least {rule.minimum}, got {value!r}")
        if rule.maximum is not None and value > rule.maximum:
            self.fail(path, f"must be at most {rule.maximum}, got {value!r}")
        if rule.above is not None and not value > rule.above:
            self.fail(path, f"must be greater than {rule.above}, got {value!r}")

    def value(self, value: Any, rule: Any, path: str, root: dict) -> Any:
        if isinstance(rule, Dynamic):
            raw = value if isinstance(value, dict) else {}
            return self.section(value, rule.schema_of(root, raw), path, root)
        if isinstance(rule, Spec):
            types = rule.types or ((type(rule.default),) if rule.default not in (REQUIRED, None) else ())
            if types and not _is_instance(value, types):
                expected = " or ".join(TYPE_NAMES.get(t, t.__name__) for t in types)
                self.fail(path, f"must be {expected}, got {_describe(value)}")
            if rule.choices and value not in rule.choices:
                self.fail(path, f"must be one of {list(rule.choices)}, got {value!r}"
                                + (f" ({rule.doc})" if rule.doc else ""))
            self.check_range(value, rule, path)
            if rule.check is not None and (problem := rule.check(value)):
                self.fail(path, f"{problem}, got {value!r}")
            return value
        if rule is None:
            return value
        if isinstance(rule, dict):
            if rule:
                return self.section(value, rule, path, root)
            if not isinstance(value, dict):
                self.fail(path, f"must be a mapping, got {_describe(value)}")
            return value
        if not _is_instance(value, (type(rule),)):
            self.fail(path, f"must be {TYPE_NAMES.get(type(rule), type(rule).__name__)}, "
                            f"got {_describe(value)}")
        return float(value) if isinstance(rule, float) else value


def _is_instance(value: Any, types: tuple) -> bool:
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, bool):
            continue
        if isinstance(value, t):
            return True
    return False


def _describe(value: Any) -> str:
    return f"{TYPE_NAMES.get(type(value), type(value).__name__)} ({value!r})"


def validate(conf: dict, schema: dict, origin: str = "config",
             lines: dict[str, int] | None = None, sources: dict[str, str] | None = None,
             inert_keys: list[str] | None = None) -> dict:
    """Check ``conf`` against ``schema``; returns a copy with every default filled in.
    ``inert_keys``: receives the inert keys (:class:`Spec` ``inert``) that the config sets."""
    validator = _Validator(origin, lines or {}, sources or {})
    # Dynamic sections see the top-level values (e.g. `model`) already filled in.
    static = {k: v for k, v in schema.items() if not isinstance(v, Dynamic)}
    root = validator.section({k: v for k, v in conf.items() if k in static}, static, "", {})
    unknown = {k: v for k, v in conf.items() if k not in schema}
    if unknown:
        validator.section(unknown, schema, "", root)  # raises with the closest name
    for key, rule in schema.items():
        if isinstance(rule, Dynamic):
            root[key] = validator.value(conf.get(key, copy.deepcopy(rule.default)), rule, key, root)
    if inert_keys is not None:
        inert_keys.extend(validator.inert_keys)
    return root


def section_config(schema: dict, conf: dict | None, origin: str) -> dict:
    """A class's config section (``conf``, partial or complete) checked against the class's
    ``default_conf`` schema, every default filled in. The config loader has already applied the
    same schema to a config file's section; this makes direct Python use just as safe."""
    return validate(dict(conf or {}), schema, origin)


def report_inert_keys(origin: str, keys: list[str]) -> None:
    """The one start-up line that lists the inert keys a config sets."""
    if keys:
        log.info("%s: accepted for compatibility with the original's configs, has no effect "
                 "here (docs/configs.md): %s",
                 origin, ", ".join(keys))


def load_config(path: str | Path, overrides: list[str] | tuple = (), schema: dict | None = None,
                extra_schema: Callable[[dict], dict] | None = None,
                prepare: Callable[[dict, str], None] | None = None,
                inert_keys: list[str] | None = None) -> dict:
    """Read ``path``, apply ``KEY=VALUE`` overrides, validate against ``schema`` (plus
    ``extra_schema(config)``, for keys named after other values such as
    ``<LossName>_config``) and return the complete config. ``prepare(raw, origin)`` may
    complete the raw config in place before validation (e.g. model settings inherited from a
    checkpoint's run). ``inert_keys`` receives the inert keys the config sets (for
    :func:`report_inert_keys` once every check has passed)."""
    conf, lines = _read_yaml_with_lines(path)
    sources = apply_overrides(conf, list(overrides))
    if prepare is not None:
        prepare(conf, str(path))
    if schema is None:
        return conf
    full = dict(schema)
    if extra_schema is not None:
        # The extra keys depend on validated values (e.g. `losses`), so resolve those first.
        probe = validate({k: v for k, v in conf.items() if k in schema}, schema, str(path), lines, sources)
        full.update(extra_schema(probe))
    return validate(conf, full, str(path), lines, sources, inert_keys)


def lookup(table: dict[str, Any], name: Any, key: str) -> Any:
    """``table[name]``, or an error naming the config ``key`` and the valid names."""
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), list(table), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise SCFeatError(f"{key}: unknown name '{name}'{hint} (expected one of {sorted(table)})")


def is_none_word(value: Any) -> bool:
    """``None`` or the string ``'None'``: YAML reads the original's bare word ``None`` as a
    string, where the original meant "no value"."""
    return value is None or value == "None"


def save_config(conf: dict, path: str | Path) -> None:
    """Write ``conf`` as YAML atomically (temp file + rename)."""
    from utils.atomic import atomic_open

    with atomic_open(path, "w") as f:
        yaml.safe_dump(conf, f, sort_keys=False)
