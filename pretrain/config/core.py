"""Typed configuration: dataclass defaults <- YAML files <- ``key=value`` overrides.

Every stage has one dataclass schema. ``load_config`` merges the three layers with OmegaConf
in struct mode, so an unknown key or a value of the wrong type fails while merging, before any
work starts, with an error that names the source (file or command line) and the dotted field.
After the merge each dataclass in the tree may define ``validate()`` for checks on values
(ranges, choices, relations between fields); its ``ConfigError`` is re-raised with the full
dotted path of the field.

Field documentation is the string literal written directly below a field (the attribute
docstring convention). ``field_docs`` reads it from the source, so ``--help``, the dumped
``config.yaml`` and the tests all see the same text.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import getpass
import inspect
import json
import os
import platform
import re
import socket
import subprocess
import sys
import textwrap
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from pretrain import __version__
from pretrain.resources import config_path
from pretrain.utils import PretrainError, atomic_write_json, atomic_write_text, redact, safe_name

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, raised before any work starts.

    ``field`` is the dotted path of the offending field (or ``None`` for file-level problems),
    ``source`` the YAML file or ``"command line"`` the value came from, when known.
    """

    def __init__(self, message: str, field: str | None = None, source: str | None = None):
        self.message = message
        self.field = field
        self.source = source
        where = []
        if source:
            where.append(str(source))
        if field:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)

    def with_prefix(self, prefix: str) -> "ConfigError":
        field = f"{prefix}.{self.field}" if self.field else prefix
        return ConfigError(self.message, field=field, source=self.source)


# --------------------------------------------------------------------------- field docs


@lru_cache(maxsize=None)
def field_docs(schema: type) -> dict[str, str]:
    """Map each field of the dataclass ``schema`` to the docstring written below it."""
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass")
    docs: dict[str, str] = {}
    for klass in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:] + [None]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def iter_fields(schema: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, str]]:
    """Yield ``(dotted_path, field, doc)`` for every leaf and nested field of ``schema``."""
    docs = field_docs(schema)
    for f in dataclasses.fields(schema):
        path = f"{prefix}{f.name}"
        yield path, f, docs.get(f.name, "")
        sub = _dataclass_type(f.type, schema)
        if sub is not None:
            yield from iter_fields(sub, prefix=f"{path}.")


def _dataclass_type(annotation: Any, owner: type) -> type | None:
    if isinstance(annotation, str):
        module = sys.modules[owner.__module__]
        try:
            annotation = eval(annotation, vars(module))  # noqa: S307 - our own annotations
        except Exception:
            return None
    return annotation if dataclasses.is_dataclass(annotation) else None


def is_missing(cfg: DictConfig, path: str) -> bool:
    """Whether the field at the dotted ``path`` has no value (MISSING). OmegaConf's own
    ``is_missing`` takes one key: with a dotted path it answers False for a nested field."""
    parent, _, key = path.rpartition(".")
    return OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, key)


def describe(schema: type) -> str:
    """Human-readable list of the fields of ``schema`` with defaults and docs (for ``--help``)."""
    defaults = OmegaConf.structured(schema)
    lines = []
    for path, f, doc in iter_fields(schema):
        value = OmegaConf.select(defaults, path, throw_on_missing=False)
        if isinstance(value, DictConfig):
            lines.append(f"  {path}:")
        else:
            shown = "(required)" if is_missing(defaults, path) else _yaml_scalar(value)
            lines.append(f"  {path} = {shown}")
        for doc_line in textwrap.wrap(doc, width=88):
            lines.append(f"      {doc_line}")
    return "\n".join(lines)


def _yaml_scalar(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return json.dumps(value) if not isinstance(value, str) else value


# --------------------------------------------------------------------------- loading


def check_name(value: str, field: str) -> None:
    """A ``ConfigError`` on ``field`` unless ``value`` is one safe path component."""
    try:
        safe_name(value, field)
    except PretrainError as e:
        raise ConfigError(str(e).split(": ", 1)[1], field=field) from None


def quote_override(name: str, value: Any) -> str:
    """``name=value`` as an override that reads back as exactly ``value``: strings are quoted,
    so that a path such as ``a: b``, ``null`` or ``runs/x #2`` (YAML would cut at `` #``) stays
    the string it is."""
    if isinstance(value, str):
        return f"{name}='" + value.replace("'", "''") + "'"
    return f"{name}={value}"


def load_config(
    schema: type[T], files: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = ()
) -> T:
    """Build a validated ``schema`` instance from defaults, YAML ``files`` and ``overrides``.

    Later layers win: each YAML file in order, then the ``key=value`` overrides in order.
    Raises ``ConfigError`` naming the source and the field on any problem.
    """
    cfg = OmegaConf.structured(schema)
    for path in files:
        cfg = _merge(cfg, _read_yaml(path), source=str(path))
    # A dotlist layer cannot reach into a list (``iterations.1.k=500`` would replace the list
    # with a mapping), so keys with an index are applied one by one.
    indexed = [item for item in overrides if any(p.isdigit() for p in item.split("=", 1)[0].split("."))]
    cfg = _merge(cfg, _parse_dotlist([o for o in overrides if o not in indexed]), source="command line")
    for item in indexed:
        key, value = item.split("=", 1)
        try:
            parsed = OmegaConf.from_dotlist([f"v={value}"])["v"]
            if OmegaConf.select(cfg, key.rsplit(".", 1)[0]) is None:
                raise ConfigKeyError(f"no list entry {key.rsplit('.', 1)[0]}")
            OmegaConf.update(cfg, key, parsed, merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(_first_line(e), field=key, source="command line") from None
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(
            "is required but has no value; set it in a YAML file or as key=value",
            field=_full_key(e),
        ) from None
    except OmegaConfBaseException as e:
        raise ConfigError(_first_line(e), field=_full_key(e)) from None
    validate(obj)
    return obj  # type: ignore[return-value]


def validate(obj: Any, prefix: str = "") -> None:
    """Run ``validate()`` on ``obj`` and every nested dataclass, children first."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, prefix=f"{prefix}{f.name}.")
    check = getattr(obj, "validate", None)
    if check is None:
        return
    try:
        check()
    except ConfigError as e:
        raise (e.with_prefix(prefix.rstrip(".")) if prefix else e) from None


class _Loader(yaml.SafeLoader):
    """YAML as version 1.2 reads scalars: ``24:00:00`` and ``30:00`` are strings. (YAML 1.1,
    PyYAML's default, reads them as base-60 integers, 86400 and 1800, which turned a SLURM time
    limit of 24 hours into 86400 minutes.)"""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, re.compile(r"(?!.*:)" + rx.pattern, rx.flags) if tag.endswith((":int", ":float")) else rx)
            for tag, rx in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_SEXAGESIMAL = re.compile(r"[-+]?\d+(:[0-5]?\d)+(\.\d*)?")


def _read_yaml(path: str | os.PathLike) -> DictConfig:
    path = config_path(path)  # configs/... also names the configs shipped with the package
    if not path.is_file():
        raise ConfigError("config file not found", source=str(path))
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"must hold a mapping of field names to values, not {type(data).__name__}",
            source=str(path),
        )
    return OmegaConf.create(data)


def _parse_dotlist(items: Sequence[str]) -> DictConfig:
    for item in items:
        key = item.split("=", 1)[0]
        if "=" not in item or not key.strip():
            raise ConfigError(
                f"override '{item}' is not of the form key=value", source="command line"
            )
    # OmegaConf reads values as YAML 1.1: quote what it would take for a base-60 number.
    items = [f"{k}='{v}'" if _SEXAGESIMAL.fullmatch(v) else f"{k}={v}"
             for k, v in (item.split("=", 1) for item in items)]
    try:
        return OmegaConf.from_dotlist(list(items))
    except OmegaConfBaseException as e:
        raise ConfigError(_first_line(e), source="command line") from None


def _merge(cfg: DictConfig, layer: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except ConfigKeyError as e:
        key = _full_key(e)
        raise ConfigError(_unknown_key_message(cfg, key), field=key, source=source) from None
    except OmegaConfBaseException as e:
        raise ConfigError(_first_line(e), field=_full_key(e), source=source) from None


def _unknown_key_message(cfg: DictConfig, key: str) -> str:
    parent_path, _, name = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    valid = list(parent.keys()) if isinstance(parent, DictConfig) else []
    message = "unknown field"
    close = difflib.get_close_matches(name, [str(v) for v in valid], n=1, cutoff=0.6)
    if close:
        suggestion = f"{parent_path}.{close[0]}" if parent_path else close[0]
        message += f"; did you mean '{suggestion}'?"
    elif valid:
        message += f"; valid fields here: {', '.join(str(v) for v in valid)}"
    return message


def _full_key(e: OmegaConfBaseException) -> str | None:
    key = getattr(e, "full_key", None)
    return str(key) if key not in (None, "") else None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# --------------------------------------------------------------------------- run records


def to_yaml(cfg: Any) -> str:
    """Resolved config as YAML, with each field's docstring as a comment above it."""
    container = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    lines = [f"# Resolved configuration ({type(cfg).__name__}), written by pretrain {__version__}."]
    _emit_yaml(type(cfg), container, 0, lines)
    return "\n".join(lines) + "\n"


def template_yaml(schema: type) -> str:
    """Every field of ``schema`` at its default, with its docstring as a comment; fields without
    a default are ``???`` and marked REQUIRED (a file to start a config from: the value
    ``???`` left in place is refused as missing, naming the field)."""
    container = OmegaConf.to_container(OmegaConf.structured(schema), enum_to_str=True)
    lines = [f"# Template of {schema.__name__} (pretrain {__version__}): every field at its default; "
             "set the REQUIRED ones."]
    _emit_yaml(schema, container, 0, lines)
    return "\n".join(lines) + "\n"


def _emit_yaml(schema: type, values: dict, depth: int, lines: list[str]) -> None:
    docs = field_docs(schema)
    pad = "  " * depth
    for f in dataclasses.fields(schema):
        for doc_line in textwrap.wrap(docs.get(f.name, ""), width=96 - len(pad)):
            lines.append(f"{pad}# {doc_line}")
        sub = _dataclass_type(f.type, schema)
        if sub is not None:
            lines.append(f"{pad}{f.name}:")
            _emit_yaml(sub, values[f.name], depth + 1, lines)
        else:
            if values[f.name] == "???":  # OmegaConf's MISSING: a field without a default
                lines.append(f"{pad}{f.name}: ???  # REQUIRED")
                continue
            dumped = yaml.safe_dump(values[f.name], default_flow_style=True, width=10**6)
            dumped = dumped.strip().removesuffix("...").strip()
            lines.append(f"{pad}{f.name}: {dumped}")


def _ours(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a ``run.json`` this project wrote."""
    try:
        saved = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(saved, dict) and "pretrain_version" in saved and "schema" in saved


def refuse_foreign_record(run_dir: str | os.PathLike) -> None:
    """A ``config.yaml`` or ``run.json`` this project did not write is the user's: never
    replaced (a run directory named by mistake must not cost anyone their files). Called before
    anything is written to a run directory, its lock included."""
    run_dir = Path(run_dir)
    ours = _ours(run_dir)
    for name in ("config.yaml", "run.json"):
        if (run_dir / name).exists() and not ours:
            raise PretrainError(f"{run_dir / name} exists and was not written by pretrain (no run.json of a "
                                "pretrain run beside it); it would be replaced: move it away or choose another "
                                "run_dir")


# Fields that say how a job runs, not what it makes: a rerun that changes only these is the
# same job (iterate leaves them out of its fingerprints for the same reason).
HOW_NOT_WHAT = ("jobs", "device", "batch_samples", "task", "num_tasks", "overwrite", "threads", "dry_run")


def _recorded_config(run_dir: Path) -> dict | None:
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return saved if isinstance(saved, dict) else None


def same_job(run_dir: str | os.PathLike, cfg: Any) -> bool:
    """True when ``run_dir`` holds the run record of a job with ``cfg``'s config (fields in
    ``HOW_NOT_WHAT`` aside): a rerun with identical inputs, which has nothing to do once the
    first run's outputs are complete."""
    run_dir = Path(run_dir)
    saved = _recorded_config(run_dir)
    if saved is None or not _ours(run_dir):
        return False
    now = yaml.safe_load(redact(to_yaml(cfg)))
    return ({k: v for k, v in saved.items() if k not in HOW_NOT_WHAT}
            == {k: v for k, v in now.items() if k not in HOW_NOT_WHAT})


def write_run_record(run_dir: str | os.PathLike, cfg: Any, argv: Sequence[str] | None = None) -> None:
    """Write ``config.yaml`` (resolved) and ``run.json`` (version, command line, host) to ``run_dir``.

    Together they let anyone re-run exactly this job: ``--config run_dir/config.yaml``. A
    record of this very config is kept as it is (a rerun or a resume changes nothing: the
    record still says who started the job, and with what).
    """
    run_dir = Path(run_dir)
    refuse_foreign_record(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Records are shared (papers, issues, wandb): credentials never enter them (see redact).
    text = redact(to_yaml(cfg))
    if _ours(run_dir) and (run_dir / "config.yaml").is_file() and (run_dir / "config.yaml").read_text() == text:
        return
    argv = list(sys.argv if argv is None else argv)
    record = {
        "pretrain_version": __version__,
        "git_commit": git_commit(),
        "command": argv,
        "cwd": os.getcwd(),
        "schema": f"{type(cfg).__module__}.{type(cfg).__qualname__}",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "user": _user(),
        "python": platform.python_version(),
    }
    # run.json first: the tasks of an array job write the same record at once, and one that
    # found a config.yaml without the run.json beside it would take it for someone else's.
    atomic_write_json(run_dir / "run.json", redact(record))
    atomic_write_text(run_dir / "config.yaml", text)


def git_commit() -> str | None:
    """Commit of the source tree this package runs from, with ``-dirty`` for local edits."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _user() -> str | None:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry inside some containers
        return None
