"""Generic validation of nested frozen dataclasses from parsed YAML (the machinery behind :mod:`pipelines.config`).

A schema is a tree of dataclasses whose fields are typed ``str``, ``int``, ``float``, ``bool``, ``Literal[...]``,
``X | None``, ``list[X]``, ``dict[str, str]`` or another dataclass; :func:`rule_field` attaches bounds (``ge``, ``gt``,
``le``, ``nonempty``). :func:`build` makes an instance from a mapping and records every problem in a :class:`Ctx`
as ``<source>: <dotted.key>: <message>``, where the source is the environment variable that set the key (see
:func:`apply_env`) or else the file. After each dataclass is built, its cross-key check from ``Ctx.checks`` (if
any) runs and may report more problems or return a replacement. A field named ``source`` or marked
``internal`` in its metadata is never read from data.

Environment values are parsed as YAML (``[a, b]``, ``4``, ``true``, ``{team: ops}``), except for keys typed ``str``
or ``str | None``: those take the variable's text as it is, so ``ANOMALYD_KAFKA__GROUP_ID='grp #1'`` is
``grp #1`` (YAML would read a comment), and an empty value unsets an optional string; and keys typed ``int`` or
``float``: those take decimal text only (YAML 1.1 reads ``010`` as 8 and ``1:30`` as 90). Numbers inside a mapping
or list from a variable are read as decimal text too (``ANOMALYD_ALERTS='{k: 010, n: 20}'`` has k 10; ``1:30`` and
``0x10`` there are strings, refused by a number key).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = ["Check", "ConfigError", "Ctx", "apply_env", "build", "join_key", "rule_field", "where", "yaml_problem"]

_BAD = object()  # a value that failed validation


class ConfigError(ValueError):
    """Invalid configuration. ``errors`` holds one line per problem: ``<source>: <dotted.key>: <message>``."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        n = len(self.errors)
        super().__init__(f"invalid configuration ({n} error{'s' * (n != 1)}):\n" + "\n".join(self.errors))


def rule_field(default: Any, **rules: Any) -> Any:
    """A dataclass field with validation rules (ge, gt, le, nonempty) in its metadata."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=rules)
    return field(default=default, metadata=rules)


class Ctx:
    """Validation state: the file source, the cross-key checks to run (dataclass -> check), which dotted keys came
    from which environment variable, errors."""

    def __init__(self, source: str, checks: Mapping[type, Check] | None = None):
        self.source = source
        self.checks: Mapping[type, Check] = checks or {}
        self.env_keys: dict[str, str] = {}  # dotted key -> env var name
        self.env_raw: dict[str, str] = {}  # dotted key -> unparsed env value
        self.errors: list[str] = []
        self.bad: set[str] = set()

    def where(self, key: str) -> str:
        return where(key, self.env_keys, self.source)

    def err(self, key: str, msg: str, because: str | None = None) -> None:
        """``because``: another key whose value makes ``key``'s wrong, named with its variable when it came from the
        environment and ``key`` did not (a protocol from the environment, a mechanism left out of the file)."""
        line = f"{self.where(key)}: {key or '(top level)'}: {msg}"
        other = self.where(because) if because is not None else ""
        if other.startswith("environment variable") and other != self.where(key):
            line += f" ({because} from {other})"
        self.errors.append(line)
        self.bad.add(key)

    def is_bad(self, *keys: str) -> bool:
        return any(b == k or b.startswith((k + ".", k + "[")) for b in self.bad for k in keys)


def where(key: str, env_keys: Mapping[str, str], source: str) -> str:
    """Where ``key`` was set: ``environment variable NAME`` when it or a section above it came from the
    environment (``env_keys``: dotted key -> variable), else ``source`` (the file)."""
    k = key
    while k:
        if k in env_keys:
            return f"environment variable {env_keys[k]}"
        k = k[: max(k.rfind("."), k.rfind("["), 0)]
    return source


def internal(f: dataclasses.Field) -> bool:
    """Whether a dataclass field is bookkeeping (``source``, or metadata ``internal``), never read from data."""
    return f.name == "source" or bool(f.metadata.get("internal"))


Check = Callable[[Any, Mapping, str, Ctx], Any]
"""A cross-key check: ``(instance, its raw mapping, its dotted key, ctx) -> instance`` (possibly replaced)."""


def join_key(key: str, name: str | int) -> str:
    """Dotted key of a mapping entry (``key.name``) or list element (``key[i]``)."""
    if isinstance(name, int):
        return f"{key}[{name}]"
    return f"{key}.{name}" if key else name


def _describe(v: Any, key: str = "") -> str:
    """Type and (unless ``key`` is a password) shortened repr of a value, for error messages."""
    text = "(hidden)" if key.endswith("password") else repr(v)
    return f"{type(v).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _parse_env_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_EnvLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError):  # ValueError: an explicit tag that does not fit (!!int x)
        return text


def apply_env(raw: dict, env: Mapping[str, str], prefix: str, root: type, ctx: Ctx) -> None:
    """Write ``<prefix><KEY>[__<SUBKEY>...]`` overrides (values parsed as YAML; :func:`build` takes the raw text
    for string keys) into ``raw`` (shallow names first), recording their dotted keys and texts; a name without
    ``__`` counts only if it names a top-level field of ``root``."""
    top = {f.name for f in dataclasses.fields(root) if not internal(f)}
    items = []
    for name, text in env.items():
        parts = name[len(prefix):].lower().split("__")
        if name.upper().startswith(prefix) and (len(parts) > 1 or parts[0] in top):
            items.append((len(parts), name, parts, text))  # e.g. not ANOMALYD_CONFIG, ANOMALYD_CACHE
        elif (name.upper().startswith(prefix) and not _SERVICE_LINK.match(text)
              and (key := _single_underscore_key(parts[0], root, top))):
            ctx.env_keys[key] = name  # ANOMALYD_KAFKA_GROUP_ID: a typo that was silently not read
            ctx.err(key, f"not read: a section and its key are separated by two underscores "
                         f"({prefix}{key.replace('.', '__').upper()})")
    for _, name, parts, text in sorted(items):
        if "" in parts:  # ANOMALYD___ALERTS, ANOMALYD_ALERTS__, ANOMALYD_ALERTS____K: no key of the file's
            ctx.errors.append(f"environment variable {name}: an empty key name (a leading, trailing or tripled "
                              f"underscore: {prefix}<SECTION>__<KEY>)")
            continue
        node, key, tp = raw, "", root
        for part in parts[:-1]:
            key = join_key(key, part)
            tp = _field_type(tp, part)
            if node.get(part) is not None and not isinstance(node[part], dict) and _is_mapping_type(tp):
                # the file's value, or a shallower variable's, would be dropped unseen
                ctx.err(key, f"expected a mapping, got {_describe(node[part], key)} ({name} sets a key below it)")
            if not isinstance(node.get(part), dict):
                node[part], ctx.env_keys[key] = {}, name
                ctx.env_raw.pop(key, None)  # a shallower variable's text is no longer the value: not taken as it is
            node = node[part]
        key = join_key(key, parts[-1])
        node[parts[-1]] = _parse_env_value(text)
        ctx.env_keys[key], ctx.env_raw[key] = name, text


def _field_type(tp: Any, name: str) -> Any:
    """The type of field ``name`` of dataclass ``tp`` (``X | None`` unwrapped), or None when unknown."""
    if not dataclasses.is_dataclass(tp) or name not in {f.name for f in dataclasses.fields(tp)}:
        return None
    ftp = get_type_hints(tp)[name]
    if get_origin(ftp) in (Union, types.UnionType):
        ftp = next((a for a in get_args(ftp) if a is not type(None)), None)
    return ftp


def _is_mapping_type(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or get_origin(tp) is dict


_SERVICE_LINK = re.compile(r"(tcp|udp|sctp)://")  # Kubernetes sets <SERVICE>_PORT=tcp://... (a Service anomalyd-http)


def _single_underscore_key(name: str, root: type, top: set[str]) -> str | None:
    """The dotted key that ``section_key`` (one underscore, not two) names in ``root``, else None (other variables
    with the prefix, such as ANOMALYD_KAFKA_PORT, are someone else's)."""
    hints = get_type_hints(root)
    for section in top:
        rest = name[len(section) + 1:]
        if name.startswith(section + "_") and dataclasses.is_dataclass(hints.get(section)):
            if rest in {f.name for f in dataclasses.fields(hints[section]) if not internal(f)}:
                return join_key(section, rest)
    return None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def build(cls: type, data: Any, key: str, ctx: Ctx) -> Any:
    """Instance of dataclass ``cls`` from mapping ``data``; bad optional values fall back to defaults (error
    recorded); returns _BAD only when a required key is missing or bad."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        ctx.err(key, f"expected a mapping, got {_describe(data)}")
        return _BAD if any(map(_required, dataclasses.fields(cls))) else cls()
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not internal(f)}
    for k in data:
        if k not in fields:
            close = difflib.get_close_matches(str(k), fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(fields)}"
            ctx.err(join_key(key, str(k)), f"unknown key ({hint})")
    kwargs: dict[str, Any] = {}
    complete = True
    for name, f in fields.items():
        sub = join_key(key, name)
        if name in data:
            value = _convert(hints[name], data[name], sub, ctx)
            if value is not _BAD and (ctx.is_bad(sub) or _check_rules(value, f.metadata, sub, ctx)):
                kwargs[name] = value
                continue
        elif _required(f):
            ctx.err(sub, "missing required key")
        complete = complete and not _required(f)
    if not complete:
        return _BAD
    obj = cls(**kwargs)
    check = ctx.checks.get(cls)
    return check(obj, data, key, ctx) if check else obj


def _convert(tp: Any, v: Any, key: str, ctx: Ctx) -> Any:
    """``v`` checked against type ``tp`` (recursively); records an error and returns _BAD on mismatch."""
    origin, args = get_origin(tp), get_args(tp)
    if key in ctx.env_raw and (tp is str or (origin in (Union, types.UnionType) and set(args) == {str, type(None)})):
        # the variable's text, not YAML: 'grp #1' is not 'grp', '123' is a string; without the line breaks that end
        # it, as a value from a Kubernetes Secret made with --from-file ends in the file's last newline
        text = ctx.env_raw[key].rstrip("\r\n")
        return None if text == "" and tp is not str else text
    if key in ctx.env_raw and tp in (int, float):
        return _env_number(tp, ctx.env_raw[key], key, ctx)
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        origin, args = get_origin(tp), get_args(tp)
    if isinstance(v, _EnvNumber):  # a number's text from a variable's mapping or list: the key's type reads it
        if tp in (int, float):
            return _env_number(tp, str(v), key, ctx)
        v = str(v)
    if dataclasses.is_dataclass(tp):
        return build(tp, v, key, ctx)
    if origin is Literal:
        if isinstance(v, str) and v in args:
            return v
        ctx.err(key, f"must be one of {', '.join(map(str, args))}; got {_describe(v)}")
        return _BAD
    if origin is list:
        if not isinstance(v, list):
            ctx.err(key, f"expected a list, got {_describe(v)}")
            return _BAD
        items = [_convert(args[0], x, join_key(key, i), ctx) for i, x in enumerate(v)]
        return [x for x in items if x is not _BAD]  # bad elements are dropped (and reported)
    if origin is dict:
        if not isinstance(v, dict):
            ctx.err(key, f"expected a mapping, got {_describe(v)}")
            return _BAD
        for k in v:
            if not isinstance(k, str):
                ctx.err(join_key(key, str(k)), f"key must be a string, got {_describe(k)}")
        out = {str(k): _convert(str, x, join_key(key, k), ctx) for k, x in v.items() if isinstance(k, str)}
        return {k: x for k, x in out.items() if x is not _BAD}
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if type(v) is not tp or (tp is float and not math.isfinite(v)):
        hint = " (quote it)" if tp is str and isinstance(v, int | float | bool) else ""
        ctx.err(key, f"expected {'a finite ' if tp is float else ''}{tp.__name__}, got {_describe(v, key)}{hint}")
        return _BAD
    return v


_ENV_NUMBER = {int: re.compile(r"[+-]?[0-9]+"), float: re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")}


def _env_number(tp: type, text: str, key: str, ctx: Ctx) -> Any:
    """A number from an environment variable's text, decimal only: YAML 1.1 would read ``010`` as 8 (octal) and
    ``1:30`` as 90 (base 60)."""
    if _ENV_NUMBER[tp].fullmatch(text.strip()):
        v = tp(text.strip())
        if math.isfinite(v):
            return v
    what = "a decimal integer such as 30" if tp is int else "a decimal number such as 2.5 or 1e3"
    ctx.err(key, f"expected {what}, got {text!r}")
    return _BAD


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_NUMBER = "tag:anomalyd,2026:env-number"


class _EnvNumber(str):
    """A plain scalar that YAML would read as a number, in a mapping or list from a variable: a number key reads
    its text as decimal (:func:`_env_number`), a string key as the text it is (``{zone: 09}``: ``09``)."""


class _EnvLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose plain numbers stay text (:class:`_EnvNumber`) until a key's type reads them, as a
    number key's own variable is read: in ``ANOMALYD_ALERTS='{k: 010, n: 20}'`` k is 10, not YAML 1.1's octal 8,
    ``1:30`` or ``0x10`` is refused by a number key, not 90 or 16, and a label ``09`` stays ``09``."""

    yaml_implicit_resolvers = {c: [(_NUMBER if t in (_INT, _FLOAT) else t, r) for t, r in rs]
                               for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}


_EnvLoader.add_implicit_resolver(_NUMBER, re.compile(rf"(?:{_ENV_NUMBER[float].pattern})\Z"), list("+-.0123456789"))
_EnvLoader.add_constructor(_NUMBER, lambda loader, node: _EnvNumber(loader.construct_scalar(node)))


def _construct_decimal(tp: type, loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
    text = loader.construct_scalar(node)
    if _ENV_NUMBER[tp].fullmatch(text):
        return tp(text)
    return yaml.SafeLoader.yaml_constructors[_INT if tp is int else _FLOAT](loader, node)  # an explicit !!int 0x10


for _tag, _tp in ((_INT, int), (_FLOAT, float)):  # explicit tags: !!int 010 is 10
    _EnvLoader.add_constructor(_tag, lambda loader, node, tp=_tp: _construct_decimal(tp, loader, node))
del _tag, _tp


_RULES = {"ge": (operator.ge, "must be >= {}"), "gt": (operator.gt, "must be > {}"),
          "le": (operator.le, "must be <= {}"), "nonempty": (lambda v, _: len(v) > 0, "must not be empty")}


def _check_rules(v: Any, rules: Mapping[str, Any], key: str, ctx: Ctx) -> bool:
    """Check the field's metadata rules (see :func:`rule_field`); record the first failure."""
    for rule, bound in rules.items():
        test, what = _RULES[rule]
        if not test(v, bound):
            ctx.err(key, f"{what.format(bound)}, got {v!r}")
            return False
    return True


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently: a second
    ``processing:`` section would replace the first one whole). Checked on the composed document, before any
    construction: merging (``<<``) rewrites mapping nodes in place, and keys it brings in may be overridden."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicates(node, set())
        return super().construct_document(node)

    def _refuse_duplicates(self, node: yaml.Node, seen: set[int]) -> None:
        if id(node) in seen:  # an alias: its anchor was checked
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                self._refuse_duplicates(item, seen)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = self.construct_object(key_node)
                    if key in first:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (first at line {first[key].start_mark.line + 1})",
                            key_node.start_mark)
                    first[key] = key_node
                self._refuse_duplicates(key_node, seen)
                self._refuse_duplicates(value_node, seen)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(exc: yaml.YAMLError) -> str:
    """' at line L, column C: <problem>' of a YAML error, on one line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{problem} ({context})" if context else problem
    return f"{where}: {' '.join(text.split())}"
