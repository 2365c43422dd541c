"""What every command shares: one-line errors and the console."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from rlopt_cli.errors import RloptError
from rlopt_cli.runtime.cpu_kernels import pin

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn RloptError into `error: ...` on stderr with exit 2, and Ctrl-C into exit 130; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RloptError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: finished checkpoints are kept; rerun the same command to resume", err=True
            )
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def console() -> Any:
    """stdout console; when it is not a terminal (make, a pipe, a log) tables get 160 columns, not rich's 80."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pin_cpu_kernels(isa: str) -> None:
    """Pin torch's CPU kernels (train.cpu_isa) before torch loads; says so in one line where it cannot."""
    if note := pin(isa):
        say(note)
