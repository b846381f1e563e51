"""One settings schema per component: a pydantic-settings model from which the command-line flags,
the environment variable names and the config-file keys are all derived.

Precedence everywhere: flag > environment > config file > the model's default. Empty values in the
environment or the file count as unset; an empty flag value is kept (``--cors-origins ''``).

- field ``api_port`` → env ``API_PORT``, flag ``--api-port``, file key ``api_port``; a field
  overrides them with ``json_schema_extra={"flags": ["--port"], "env": "OTHER_NAME"}`` (first flag
  is the main one, the others are aliases kept for compatibility);
- ``--help`` shows each field's description, its env name, its choices and default;
- a bad value raises :class:`SettingsError` with one line naming the field's flag and env name;
- ``Model()`` alone reads the same env names (``services.api`` / ``services.web`` ``get_settings``).

Light on purpose (pydantic only): the web image, the stdlib launcher ``deploy.py`` after its
bootstrap, the core CLI and the vLLM launcher all import it, and none of them may pull torch.
"""

from __future__ import annotations

import argparse
import contextvars
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("settings_environ", default=None)
"""The environment the models read; None = ``os.environ`` (``load`` swaps in its own)."""


class SettingsError(ValueError):
    """A bad setting (flag, environment or file); the message is one line saying which and why."""

    user_error = True
    """Printed as one line by the ``telechat`` dispatcher (:func:`telechat.cli.run_guarded`); marked rather
    than derived from ``telechat.errors.UserError`` so the web UI imports no model runtime (torch)."""

    exit_code = 2


# ---------------------------------------------------------------------------------------------- names


def _extra(field: FieldInfo) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable of a field: its upper-case name unless the field says otherwise."""
    return _extra(field).get("env") or name.upper()


def flags_of(name: str, field: FieldInfo) -> list[str]:
    """The field's flags, main one first: ``--field-name`` unless the field lists its own."""
    return list(_extra(field).get("flags") or [f"--{name.replace('_', '-')}"])


def env_names(model: type[BaseSettings]) -> dict[str, str]:
    """Field name → environment variable, in field order."""
    return {name: env_name(name, f) for name, f in model.model_fields.items()}


def _choices(annotation: Any) -> tuple | None:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _choices(args[0])
    return None


def _is_bool(annotation: Any) -> bool:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation is bool or (typing.get_origin(annotation) in (typing.Union, types.UnionType) and args == [bool])


# ---------------------------------------------------------------------------------------------- sources

class _EnvSource(PydanticBaseSettingsSource):
    """Each field from its env name (see :func:`env_name`); blank values are unset."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every field at once

    def __call__(self) -> dict[str, Any]:
        return env_values(self.settings_cls, _ENVIRON.get())


def env_values(model: type[BaseSettings], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The fields set (non-blank) in ``environ`` (default ``os.environ``)."""
    environ = os.environ if environ is None else environ
    out = {}
    for name, env in env_names(model).items():
        value = environ.get(env)
        if value is not None and value.strip():
            out[name] = value
    return out


class CliSettings(BaseSettings):
    """Base of every component's settings: init values (flags) > env names of :func:`env_name` > defaults."""

    model_config = SettingsConfigDict(extra="ignore", protected_namespaces=())

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, _EnvSource(settings_cls)


# ---------------------------------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, missing value) are one-line :class:`SettingsError`."""

    def error(self, message: str) -> typing.NoReturn:
        raise SettingsError(f"{message} (see {self.prog} --help)")


class _JoinValues(argparse.Action):
    """Store a flag's several values as one comma-separated string (the form the env variable takes)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, ",".join(values))


def _default_text(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    if default is None:
        return ""
    if isinstance(default, bool):
        default = str(default).lower()
    return f"; default {default}"


def _help(name: str, field: FieldInfo) -> str:
    text = (field.description or name.replace("_", " ")).rstrip(".")
    return f"{text} [env {env_name(name, field)}{_default_text(field)}]".replace("%", "%%")


def build_parser(model: type[BaseSettings], *, prog: str, description: str,
                 epilog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per field of ``model`` (callers may add their own after)."""
    p = _Parser(prog=prog, description=description, epilog=epilog)
    for name, field in model.model_fields.items():
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": _help(name, field),
                                  "metavar": env_name(name, field)}
        choices = _choices(field.annotation)
        if _extra(field).get("nargs"):  # several values, kept as one comma-separated string
            kwargs.update(nargs=_extra(field)["nargs"], action=_JoinValues)
        if _is_bool(field.annotation):
            kwargs.update(nargs="?", const="true", metavar="true|false")
        elif choices:
            kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}"
        p.add_argument(*flags_of(name, field), **kwargs)
    return p


# ---------------------------------------------------------------------------------------------- loading

def load(model: type[CliSettings], flags: Mapping[str, Any] | argparse.Namespace | None = None, *,
         environ: Mapping[str, str] | None = None, file_values: Mapping[str, Any] | None = None,
         file_name: str = "config file"):
    """``model`` from flags > ``environ`` (default ``os.environ``) > ``file_values`` > defaults.

    ``flags``: a namespace from :func:`build_parser` (entries that are not fields are ignored).
    ``file_values``: keys must be field names (else one-line error listing the valid ones).
    """
    fields = model.model_fields
    given = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags or {})
    from_flags = {k: v for k, v in given.items() if k in fields and v is not None}
    file_values = dict(file_values or {})
    unknown = sorted(set(file_values) - set(fields))
    if unknown:
        raise SettingsError(f"{file_name}: unknown key {unknown[0]!r}; valid keys: {', '.join(fields)}")
    from_file = {k: v for k, v in file_values.items() if v is not None and v != ""}
    from_env = env_values(model, environ)
    origin = {**{k: f"from {file_name}" for k in from_file}, **{k: "from the environment" for k in from_env},
              **{k: "from the command line" for k in from_flags}}
    merged = {**from_file, **from_env, **from_flags}
    token = _ENVIRON.set({})  # everything is in ``merged`` already
    try:
        return model(**merged)
    except ValidationError as e:
        raise SettingsError(describe(model, e, merged, origin)) from None
    finally:
        _ENVIRON.reset(token)


def describe(model: type[BaseSettings], error: ValidationError, values: Mapping[str, Any] | None = None,
             origin: Mapping[str, str] | None = None) -> str:
    """One line for the first error: the field, its flag and env name, the value given and why it is bad."""
    err = error.errors(include_url=False)[0]
    name = str(err["loc"][0]) if err.get("loc") else ""
    field = model.model_fields.get(name)
    if field is None:
        return f"invalid settings: {err['msg']}"
    value = (values or {}).get(name, err.get("input"))
    secret = SecretStr in (field.annotation, *typing.get_args(field.annotation))
    shown = "***" if secret else repr(value)
    where = f" {origin[name]}" if origin and name in origin else ""
    return (f"invalid {name} (flag {flags_of(name, field)[0]}, env {env_name(name, field)}): "
            f"{shown}{where}: {err['msg']}")


def parse(model: type[CliSettings], argv: list[str], *, prog: str, description: str,
          environ: Mapping[str, str] | None = None):
    """Build the parser, parse ``argv`` and load ``model``: the one call of a component without extra flags."""
    return load(model, build_parser(model, prog=prog, description=description).parse_args(argv), environ=environ)


def to_env(settings: BaseSettings) -> dict[str, str]:
    """The settings as environment variables (set fields only), e.g. for a child process that reads them."""
    out = {}
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        out[env_name(name, field)] = str(value).lower() if isinstance(value, bool) else str(value)
    return out
