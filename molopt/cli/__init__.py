"""The ``molopt`` command line: parse, merge settings, call the library, map errors to exit
codes (0 all converged, 1 some structure failed or did not converge, 2 usage/configuration).
Diagnostics go to stderr; ``--json`` records to stdout. JAX is imported only by commands
that compute, so ``molopt --help`` is instant.

This package is the only part of molopt that imports Typer and Rich. Here: the Typer
``app``, the console entry point :func:`main` and the helpers every command shares. One
module per command or group of commands (``relax``, ``potentials``, ``training``: train and
evaluate, ``fit``, ``hessian``, ``results``: info, convert and plot), each body a few lines
over a library call; what is drawn on the terminal is in :mod:`molopt.cli.display`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from molopt import __version__, startup
from molopt.cli.display import LogConsole
from molopt.errors import MoloptError
from molopt.optimizers import NAMES as OPTIMIZER_NAMES


@contextmanager
def _whole_words() -> Iterator[None]:
    """Help text wrapped at spaces only: Python's text wrapper also breaks after hyphens,
    which cuts option names (``--check-`` / ``hessian``) and words across lines."""
    from typer._click import _textwrap

    breaking = _textwrap.TextWrapper

    class WholeWords(breaking):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "break_on_hyphens": False})

    _textwrap.TextWrapper = WholeWords
    try:
        yield
    finally:
        _textwrap.TextWrapper = breaking


class _Group(TyperGroup):
    def format_help(self, ctx, formatter) -> None:
        with _whole_words():
            super().format_help(ctx, formatter)


class _Command(TyperCommand):
    def format_help(self, ctx, formatter) -> None:
        with _whole_words():
            super().format_help(ctx, formatter)


app = typer.Typer(
    name="molopt",
    cls=_Group,
    help="Relax molecules, clusters and crystals with differentiable JAX potentials.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Click's plain help: words wrapped whole at the terminal's width, no type placeholder on
    # flags, and "[default: ...]" in help texts shown as written (Rich reads it as markup)
    rich_markup_mode=None,
)
#: Diagnostics, progress and summaries (stderr); results go to stdout. Plain, unwrapped
#: lines when stderr is a log file or a pipe.
err = LogConsole(stderr=True, highlight=False)


#: ``--optimizer`` choices: the optimizers' one table (:data:`molopt.optimizers.NAMES`)
OptimizerName = StrEnum("OptimizerName", {name: name for name in OPTIMIZER_NAMES})


class Precision(StrEnum):
    float64 = "float64"
    float32 = "float32"


def _version(value: bool):
    if value:
        typer.echo(f"molopt {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = None,
):
    """molopt: structure optimization with JAX (FIRE, L-BFGS, variable cell), H5MD output."""


def fail(message: str, code: int = 2) -> NoReturn:
    """The error ``message`` on stderr (no traceback), then exit with ``code``."""
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def output_file(path: str, overwrite: bool, flag: str = "--overwrite") -> Path:
    """``path`` as a file a command may write: exits 2 naming it when it is a directory, when
    its directory does not exist, or when it exists and ``overwrite`` is not given (no
    command replaces a file, a relax output included, unless asked with ``flag``)."""
    target = Path(path)
    if target.is_dir():
        fail(f"{path}: is a directory; give a file name for the output")
    if not target.parent.is_dir():
        fail(f"{path}: the directory {target.parent} does not exist")
    if target.exists() and not overwrite:
        fail(f"{path} already exists; pass {flag} to replace it")
    return target


def image_file(path: str, overwrite: bool, needed_by: str) -> Path:
    """:func:`output_file` for a figure: exits 2 first when matplotlib (which ``needed_by``
    needs) is missing or does not write the format of ``path``'s extension."""
    from molopt.io.plot import image_format_problem

    try:
        problem = image_format_problem(path)
    except ImportError:
        fail(f"{needed_by} needs matplotlib: pip install 'molopt[plot]'")
    if problem:
        fail(f"{path}: {problem}")
    return output_file(path, overwrite)


#: ``--overwrite`` (alias ``--force``) of the commands that write files.
Overwrite = Annotated[
    bool,
    typer.Option("--overwrite", "--force", help="Replace output files that already exist."),
]


@contextmanager
def reported(*kinds: type[BaseException], code: int = 2) -> Iterator[None]:
    """Within the block, a :class:`MoloptError` (or one of ``kinds``) is reported by
    :func:`fail` with exit ``code``."""
    try:
        yield
    except (MoloptError, *kinds) as exc:
        fail(str(exc), code)


@contextmanager
def interruptible(message: str) -> Iterator[None]:
    """Within the block, Ctrl-C/SIGTERM (acted on at the library's safe points) prints
    ``message`` on stderr and exits with 130."""
    from molopt import interrupt

    try:
        with interrupt.deferred():
            yield
    except KeyboardInterrupt:
        err.print(message)
        raise typer.Exit(130) from None


from molopt.cli import fit, hessian, potentials, relax, results, training  # noqa: E402

# in the order `molopt --help` lists them, each with the line it shows there (Click would cut
# the docstring's first sentence at 45 characters)
for _command, _summary in (
    (relax.relax, "Relax structures to a local energy minimum."),
    (potentials.potentials, "List the shipped potentials."),
    (training.train, "Train a PaiNN potential on labelled data."),
    (training.evaluate, "Errors of a potential on labelled data."),
    (fit.fit, "Fit Lennard-Jones parameters to target properties."),
    (hessian.hessian, "Hessian eigenvalues and harmonic frequencies of a structure."),
    (results.info, "What is inside molopt trajectories."),
    (results.convert, "Write trajectory frames in any format ASE writes."),
    (results.plot, "Plot energy and fmax against optimizer step."),
):
    app.command(cls=_Command, short_help=_summary)(_command)
del _command, _summary


def main() -> NoReturn:
    """The console entry point: run the command, then end the process (:func:`startup.leave`:
    without the interpreter's teardown once JAX has run)."""
    startup.standalone()  # this process is molopt's alone: vesin without PyTorch and CuPy
    try:
        app()
        code = 0
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:  # pragma: no cover - interrupted outside a command body
        code = 130
    if isinstance(code, str):
        err.print(code, markup=False, highlight=False)
        code = 1
    startup.leave(0 if code is None else int(code))
