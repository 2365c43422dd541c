"""What every command shares: one-line errors and the console."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import typer
from typer.core import TyperGroup

from rlopt_cli.errors import RloptError, os_failure
from rlopt_cli.runtime.cpu_kernels import pin

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn RloptError into `error: ...` on stderr with its exit code (2 input, 3 environment), an OSError the
    user can fix (disk full, read-only, permissions) into exit 3, and Ctrl-C into exit 130; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RloptError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except OSError as err:
            failure = os_failure(err)
            if failure is None:  # anything else is a bug: keep its traceback
                raise
            typer.echo(f"error: {failure}", err=True)
            raise typer.Exit(failure.exit_code) from None
        except KeyboardInterrupt:
            typer.echo(
                "interrupted: finished checkpoints are kept; rerun the same command to resume", err=True
            )
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class OneLineUsageErrors(TyperGroup):
    """The command group, with click's usage errors (`--steps 1e9`, a missing argument) as one `error:` line
    and exit 2 like every other error, instead of a usage block and a boxed message."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        try:
            result = super().main(args, prog_name, complete_var, False, windows_expand_args, **extra)
        except typer.TyperException as err:  # click's usage errors (typer vendors click)
            if type(err).__name__ == "NoArgsIsHelpError":  # `rlopt` alone: typer has printed the help
                sys.exit(2)
            ctx = getattr(err, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {err.format_message()}{hint}", err=True)
            sys.exit(getattr(err, "exit_code", 2))
        except typer.Abort:
            typer.echo("aborted", err=True)
            sys.exit(1)
        # without standalone mode an Exit comes back as its code; our commands themselves return None
        sys.exit(result if isinstance(result, int) else 0)


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
