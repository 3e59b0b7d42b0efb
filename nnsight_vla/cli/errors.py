"""The CLI's one error handler: every nnsight-vla error becomes one line on stderr and its branch's exit code
(:data:`nnsight_vla.errors.EXIT_CODES`); never a traceback for a user error."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import typer

from ..errors import VLAError, exit_code


def handled(fn: Callable) -> Callable:
    """Run a command; a VLAError or OSError is printed as ``error: ...`` (one line) and exits with its code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VLAError as error:
            first = str(error).strip()
            typer.echo(f"error: {first}", err=True)
            raise typer.Exit(exit_code(error)) from None
        except OSError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def progress_enabled(progress: bool) -> bool:
    """Progress bars only when asked and stderr is a terminal (redirected, they would merge into output lines)."""
    return bool(progress) and sys.stderr.isatty()
