"""What every command line of the project does with a user's mistake: one line on stderr
naming the value and the fix, exit status 2; ``MAGE_JAX_VERBOSE=1`` (or a command's
``--verbose``) shows the Python traceback instead.

Shared by the entry points (``mage_jax.main``, ``mage_jax.plan``).
"""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

# Errors a user can cause (a config value, the mesh, the batch, a dataset, a workdir, a
# checkpoint, a weights file, a topology name, a missing optional package) are raised as these.
USER_ERRORS = (ValueError, OSError, ImportError)
USAGE_STATUS = 2  # the exit status of every such error


def one_line(text) -> str:
    return " ".join(str(text).split())


def verbose(flag_value: bool = False) -> bool:
    """A command's ``--verbose``, or ``MAGE_JAX_VERBOSE`` set to anything but 0."""
    return bool(flag_value) or os.environ.get("MAGE_JAX_VERBOSE", "") not in ("", "0")


def exit_with_error(error: BaseException, prefix: str = "ERROR",
                    hint: str = "--verbose for the traceback") -> None:
    """One line on stderr naming the error (its message names the value and the fix), then
    exit status 2."""
    sys.stderr.write(f"{prefix}: {one_line(error) or type(error).__name__} "
                     f"[{type(error).__name__}; {hint}]\n")
    sys.exit(USAGE_STATUS)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error as one line and exit status 2.

    ml_collections raises a bare AttributeError for ``--config.no_such_key=1`` on a locked
    config, and wraps an error of the config file (``configs/pretrain.py:vit_xl``) with its
    whole traceback; both become one line naming the value and the fix.
    """
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error):
        if verbose():
            raise
        _parse_error(argv, sys.exc_info()[1])


def _parse_error(argv: list[str], e: Exception) -> None:
    hint = "MAGE_JAX_VERBOSE=1 for the traceback"
    if isinstance(e, (AttributeError, KeyError)):
        detail = e
        while isinstance(detail, (AttributeError, KeyError)) and detail.args:
            detail = detail.args[0]  # AttributeError(KeyError("'key'\nDid you mean ...?"))
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        exit_with_error(ValueError(
            f"unknown config key {one_line(detail)} (overrides given: {', '.join(overrides)}). "
            f"The config is locked, so --config.<key>=<value> must name a key that the config "
            f"file defines (configs/<stage>.py, or config.json in a run's workdir): fix the "
            f"spelling or drop the override."), "FATAL Flags parsing error", hint)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [repr(e)]
    # A config file's own error comes last, after the traceback the flag wraps it in.
    where = lines[0].split(": Error whilst parsing")[0] if len(lines) > 1 else ""
    exit_with_error(ValueError(f"{where}: {lines[-1]}" if where else lines[-1]),
                    "FATAL Flags parsing error", hint)


def config_overrides(config_flag) -> list[str]:
    """The ``--config.k=v`` overrides of a config flag as sorted ``k=v`` strings (nested
    keys dotted): how a run's or a result's label names what was changed."""
    flat = []

    def walk(prefix, tree):
        for k, v in sorted(tree.items()):
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            else:
                flat.append(f"{prefix}{k}={v}")
    walk("", config_flags.get_override_values(config_flag))
    return flat
