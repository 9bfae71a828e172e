"""One config system: ml_collections ``get_config(arg)`` files, locked, with overrides.

A config file under ``configs/`` defines ``get_config(arg=None)`` returning a
``ConfigDict``; ``arg`` picks a variant (``configs/prior.py:tiny``). The same loader
serves the command line (``--config=configs/x.py:tiny --config.a.b=value``) and
research code (``load_config("configs/x.py:tiny", ["a.b=value"])``). Configs are
locked: an unknown key or a value of the wrong type fails here, before any model is
built or compiled, with a message naming the key.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags


class ConfigError(flags.Error, ValueError):
    """A config file, key or value that cannot be used. Names the offending key."""


def _known_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for name, value in cfg.items():
        path = f"{prefix}{name}"
        keys.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_known_keys(value, path + "."))
    return keys


def _explain(flag_name: str, argv: Sequence[str], error: Exception) -> ConfigError:
    """Turns absl/ml_collections parsing errors into one message that names the key."""
    message = str(error.args[0]) if error.args else str(error)
    prefix = f"--{flag_name}."
    for arg in argv:
        if not arg.startswith(prefix):
            continue
        key, _, value = arg[len(prefix):].partition("=")
        if isinstance(error, (AttributeError, KeyError, flags.UnrecognizedFlagError)):
            leaf = key.rsplit(".", 1)[-1]
            if leaf in message or key in message:
                hint = message.splitlines()[-1] if "\n" in message else "no such key"
                return ConfigError(f"unknown config key '{key}': {hint}")
        elif key in message:
            return ConfigError(f"bad value for config key '{key}': {value!r} ({message})")
    return ConfigError(message)


def _suggest(cfg: ml_collections.ConfigDict, key: str) -> str:
    close = difflib.get_close_matches(key, _known_keys(cfg), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS, name: str = "config",
                       sys_argv: Sequence[str] | None = None):
    """Defines ``--<name>=configs/x.py[:arg]`` with locked ``--<name>.a.b=value`` overrides."""
    return config_flags.DEFINE_config_file(
        name, default=None, help_string="Config file, e.g. configs/prior.py:tiny",
        flag_values=flag_values, lock_config=True,
        sys_argv=list(sys_argv) if sys_argv is not None else None)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS,
                name: str = "config") -> list[str]:
    """``app.run(..., flags_parser=...)`` helper: parses argv, re-raising config errors cleanly."""
    try:
        return flag_values(list(argv))
    except flags.Error as e:
        if any(a.startswith(f"--{name}.") for a in argv) and not isinstance(e, ConfigError):
            raise _explain(name, argv, e) from e
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise _explain(name, argv, e) from e


def app_flags_parser(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """``app.run(main, flags_parser=app_flags_parser)``: like absl's default parser, a bad
    flag or config key prints one line naming it (and the usage hint) and exits with 1."""
    import sys
    try:
        return parse_flags(argv, flag_values)
    except flags.Error as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpfull to see the flags.\n")
        sys.exit(1)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``spec`` ("path.py" or "path.py:arg") and applies ``"a.b=value"`` overrides.

    Raises:
      ConfigError: unknown key, unparsable value or wrong type; the message names the key.
    """
    argv = ["load_config", f"--config={spec}"] + [f"--config.{o}" for o in overrides]
    flag_values = flags.FlagValues()
    define_config_flag(flag_values, sys_argv=argv)
    try:
        parse_flags(argv, flag_values)
    except flags.UnrecognizedFlagError as e:
        raise ConfigError(str(e)) from e
    cfg = flag_values["config"].value
    if not isinstance(cfg, ml_collections.ConfigDict):
        # config_flags defers a load failure into an _ErrorConfig; surface it now.
        raise ConfigError(f"cannot load config {spec!r}: {getattr(cfg, '_error', cfg)}")
    return cfg


def check_keys(cfg: ml_collections.ConfigDict, required: Sequence[str]) -> None:
    """Fails early, naming each dotted key in ``required`` that ``cfg`` lacks."""
    missing = []
    for key in required:
        node = cfg
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                missing.append(key + _suggest(cfg, key))
                break
            node = node[part]
    if missing:
        raise ConfigError("config lacks required key(s): " + ", ".join(missing))
