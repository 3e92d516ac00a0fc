"""Where gateway settings come from: a TOML file, ``TERN_*`` environment variables and flags.

Precedence, lowest first: the dataclass defaults, the ``--config`` file, the environment,
the flags. Every layer works over :class:`~tern.edge.config.GatewayConfig`'s fields, so a
field added there is at once a file key (its name), an environment variable
(:func:`~tern.edge.config.env_name`) and a flag (:func:`~tern.edge.config.flag_name`).

Errors never escape as tracebacks: each is a :class:`~tern.core.errors.ConfigError` of one
line naming where the value came from (the file, the variable or the flag), the key, what was
expected and what was found. An unknown file key gets a did-you-mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from tern.core.errors import ConfigError
from tern.core.quoting import quote
from tern.edge.config import REQUIRED, ConfigValueError, GatewayConfig, env_name, flag_name

#: What each kind of value is called in an error message.
_KIND_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Key:
    """One setting: a field of GatewayConfig."""

    name: str
    #: str, int, float or bool (``X | None`` fields are their X; anything else is taken as str).
    kind: type
    default: Any
    help: str

    @property
    def env(self) -> str:
        """Its environment variable."""
        return env_name(self.name)

    @property
    def flag(self) -> str:
        """Its ``tern-gateway run`` flag."""
        return flag_name(self.name)

    @property
    def required(self) -> bool:
        """True when neither the dataclass nor anything else supplies it."""
        return self.default is dataclasses.MISSING


def keys() -> list[Key]:
    """Every setting, in the order GatewayConfig declares them."""
    hints = typing.get_type_hints(GatewayConfig)
    out = []
    for f in dataclasses.fields(GatewayConfig):
        if not f.init:
            continue
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out.append(Key(f.name, _kind(hints.get(f.name, str)), default, str(f.metadata.get("help", ""))))
    return out


def _kind(hint: Any) -> type:
    """The scalar type of a field annotation: ``int | None`` is int; a Literal or Path is str."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    return hint if hint in _KIND_WORDS else str


# --- the file ------------------------------------------------------------------------------


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings in a TOML file, checked for unknown keys and value kinds (not ranges)."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory, expected a TOML config file") from None
    except PermissionError:
        raise ConfigError(f"{where}: cannot read the config file (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    known = {k.name: k for k in keys()}
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = known.get(name)
        if key is None:
            raise ConfigError(f"{where}: unknown key {quote(name, 60)}{_did_you_mean(name, known)}")
        values[name] = _check_kind(key, value, where)
    return values


def _did_you_mean(name: str, known: Mapping[str, Key]) -> str:
    # Also match the older spellings a user may carry over from flags or the environment.
    aliases: dict[str, str] = {k: k for k in known}
    for key in known.values():
        aliases.setdefault(key.flag.lstrip("-").replace("-", "_"), key.name)
        aliases.setdefault(key.env.lower(), key.name)
        aliases.setdefault(key.env.lower().removeprefix("tern_"), key.name)
    wanted = name.lower().replace("-", "_")
    if wanted in aliases:
        return f" (did you mean {aliases[wanted]!r}?)"
    close = difflib.get_close_matches(wanted, list(aliases), n=1, cutoff=0.6)
    return f" (did you mean {aliases[close[0]]!r}?)" if close else f"; known keys: {', '.join(known)}"


def _check_kind(key: Key, value: Any, where: str) -> Any:
    """``value`` as ``key``'s kind, or a ConfigError naming the file, key, expectation and find."""
    kind = key.kind
    ok = (
        isinstance(value, bool)
        if kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float
        else isinstance(value, kind) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, str)
    )
    if not ok:
        found = f"a table {value!r}" if isinstance(value, dict) else f"{_toml_kind(value)} {value!r}"
        raise ConfigError(f"{where}: {key.name}: expected {_KIND_WORDS[kind]}, found {found}")
    return float(value) if kind is float else value


def _toml_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


# --- environment and flags -----------------------------------------------------------------


def _parse_text(key: Key, raw: str, source: str) -> Any:
    """A value given as text (environment, flag) as ``key``'s kind."""
    text = raw.strip()
    try:
        if key.kind is int:
            return int(text)
        if key.kind is float:
            return float(text)
        if key.kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
    except ValueError:
        raise ConfigError(f"{key.name}: expected {_KIND_WORDS[key.kind]}, found {quote(raw, 60)} (from {source})") from None
    return raw


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (values are parsed and checked later, with the other sources)."""
    for key in keys():
        default = "required" if key.required else f"default {key.default}"
        text = key.help or key.name.replace("_", " ")
        parser.add_argument(key.flag, dest=key.name, metavar=key.kind.__name__.upper(), help=f"{text} (env {key.env}; {default})")


def flag_values(args: argparse.Namespace) -> dict[str, str]:
    """The settings given as flags (raw text, by key name)."""
    return {k.name: getattr(args, k.name) for k in keys() if getattr(args, k.name, None) is not None}


# --- all together --------------------------------------------------------------------------


def resolve(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> GatewayConfig:
    """The validated config from the file at ``path`` (if any), ``env`` (default: os.environ),
    ``flags`` (raw text by key) and ``overrides`` (typed values by key), later ones winning."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    where = os.fspath(path) if path is not None else None
    if where is not None:
        for name, value in read_file(where).items():
            values[name], origin[name] = value, f"file:{where}"
    for key in keys():
        raw = env.get(key.env, "")
        if raw.strip():
            values[key.name], origin[key.name] = _parse_text(key, raw, f"environment {key.env}"), f"environment {key.env}"
        if flags and flags.get(key.name) is not None:
            values[key.name], origin[key.name] = _parse_text(key, str(flags[key.name]), key.flag), key.flag
        if overrides and overrides.get(key.name) is not None:
            values[key.name], origin[key.name] = overrides[key.name], "argument"
    for name in REQUIRED:
        if values.get(name) in (None, ""):
            key = next(k for k in keys() if k.name == name)
            also = f", or set {name} in {where}" if where else " or put it in the --config file"
            raise ConfigError(f"{name.replace('_', ' ')} is required: pass {key.flag}, set {key.env}{also}")
    try:
        return GatewayConfig(**values)
    except ConfigValueError as exc:
        source = origin.get(exc.key)
        if source is None or source == "argument":
            raise
        if source.startswith("file:"):
            raise ConfigError(f"{source[5:]}: {exc}") from None
        raise ConfigError(f"{exc} (from {source})") from None

