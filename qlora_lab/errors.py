"""User-facing errors: one clear message, a non-zero exit, no traceback wall.

Every problem a user can fix (bad config, bad data, missing model, missing run) raises :class:`UserError`.
The command shells catch it, print the message and exit with :data:`EXIT_USER_ERROR`; anything else is a bug
and keeps its traceback. ``HYDRA_FULL_ERROR=1`` shows the traceback for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any, TypeVar

EXIT_USER_ERROR = 2

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """A problem with the user's input that they can fix; the message says what and how."""


class ConfigError(UserError):
    """One or more invalid config values, reported together."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


def exit_on_user_error(fn: F) -> F:
    """Decorate a command's task function: a :class:`UserError` prints ``error: ...`` and exits 2.

    Hydra's own handler would print a traceback; ours prints only the message. In a multirun the error is
    re-raised so that the sweep can record the job as failed instead of the whole process exiting.
    """

    from omegaconf.errors import MissingMandatoryValue

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return fn(*args, **kwargs)
            except MissingMandatoryValue as e:  # a required field (`???` in the schema) left unset
                raise UserError(f"{e.full_key} is required: add {e.full_key}=... to the command (its meaning: "
                                "--help).") from None
        except UserError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or in_multirun():
                raise
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]


def in_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - outside Hydra there is no multirun
        return False
