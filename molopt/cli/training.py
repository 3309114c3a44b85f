"""``molopt train`` (:class:`molopt.training.train.Trainer`) and ``molopt evaluate``
(:func:`molopt.training.evaluate.errors`)."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path
from typing import Annotated

import typer

from molopt.cli import Overwrite, Precision, err, fail, image_file, interruptible, reported
from molopt.errors import ConfigError, PotentialError


def train(
    data: Annotated[
        list[str],
        typer.Argument(
            help="Labelled configurations (any ASE format with energy and forces: extxyz, OUTCAR).",
            show_default=False,
        ),
    ],
    config: Annotated[
        str,
        typer.Option(
            "--config",
            "-c",
            help="Training settings: a TOML file or a preset name (e.g. train-emt-metals).",
        ),
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory.")],
    valid: Annotated[
        list[str] | None, typer.Option(help="Validation data (default: a random split of DATA).")
    ] = None,
    test: Annotated[
        list[str] | None,
        typer.Option(help="Held-out test data: errors on it go into the model card."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT/checkpoints.")] = False,
    init: Annotated[
        str | None,
        typer.Option(
            help="Fine-tune: start from this PaiNN or SevenNet potential's weights (name or "
            "file, e.g. sevennet-0), with a fresh optimizer and schedule; the config must match "
            "its architecture. Give it again with --resume to continue an interrupted "
            "fine-tuning."
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override the config's epochs.")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress table, only the result.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            "--force",
            help="Start again in an OUT that holds an earlier training (its files replaced).",
        ),
    ] = False,
):
    """Train a PaiNN potential, or fine-tune one or SevenNet (--init); writes OUT/<name>.toml
    and its weights (OUT/<name>.eqx, or .npz for SevenNet) with a model card.
    An OUT that holds an earlier training is refused unless --resume or --overwrite."""
    from molopt.cli.display import TrainDisplay

    with reported():
        trainer = _trainer(config, data, out, valid, init, epochs, resume or overwrite)
    again = "interrupted: the last checkpoint is kept; continue with --resume"
    again += f" --init {init}" if init else ""
    with reported(), interruptible(again):
        with TrainDisplay(err, trainer.config.epochs, quiet) as display:
            trainer.run(resume=resume, progress=display.update)
    path = trainer.write_potential(_test_errors(trainer, test) if test else {})
    err.print(
        f"wrote {path} (best epoch {trainer.state['best_epoch'] + 1}, "
        f"stopped by {trainer.state['stopped']})"
    )


def _trainer(config, data, out, valid, init, epochs, replace: bool):
    """A Trainer for ``config`` (``epochs`` overriding it), fine-tuning ``init`` if given,
    writing into ``out`` (:func:`_check_out`)."""
    import dataclasses

    from molopt import config as cfg
    from molopt.potentials import registry
    from molopt.training.data import read_labelled
    from molopt.training.train import TrainConfig, Trainer

    settings = TrainConfig.from_toml(cfg.config_path(config, "train"))
    if epochs is not None:
        settings = dataclasses.replace(settings, epochs=epochs)
    _check_out(Path(out), settings.name, replace)
    start = registry.load(init) if init else None
    labelled = read_labelled(data)
    valid_data = read_labelled(valid) if valid else None
    return Trainer(settings, labelled, Path(out), valid=valid_data, sources=data, init=start)


def _check_out(out: Path, name: str, replace: bool) -> None:
    """ConfigError when ``out`` is a file, or holds an earlier training (checkpoints or the
    potential ``name``) that this run would replace without ``replace`` (--resume or
    --overwrite)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    earlier = [
        p
        for p in (out / "checkpoints" / "state.json", out / f"{name}.toml", out / f"{name}.eqx")
        if p.exists()
    ]
    if earlier and not replace:
        raise ConfigError(
            f"--out {out}: holds an earlier training ({earlier[0]}); continue it with --resume, "
            "start again with --overwrite, or choose another --out"
        )


def _test_errors(trainer, test: list[str]) -> dict:
    """The best model's errors on the ``test`` files, for the model card."""
    from molopt.training.data import read_labelled
    from molopt.training.evaluate import errors

    result = errors(trainer.best, read_labelled(test))
    result.pop("_parity")
    return {"test_data": [str(t) for t in test], **result}


def evaluate(
    potential: Annotated[str, typer.Argument(help="Potential name or file.")],
    data: Annotated[list[str], typer.Argument(help="Labelled configurations.")],
    json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    plot: Annotated[str | None, typer.Option(help="Write a parity plot (PNG/PDF).")] = None,
    precision: Annotated[
        Precision, typer.Option(help="Floating-point precision of the potential.")
    ] = Precision.float64,
    overwrite: Overwrite = False,
):
    """Energy/force/stress errors (MAE, RMSE; forces per element) of POTENTIAL on DATA."""
    from molopt.cli.display import errors_table
    from molopt.potentials import registry
    from molopt.training.data import read_labelled
    from molopt.training.evaluate import errors, parity_plot

    if plot:
        image_file(plot, overwrite, "--plot")

    with reported():
        spec = registry.load(potential)
        labelled = read_labelled(data)
        _check_covered(spec, labelled)
        result = errors(spec.potential, labelled, precision.value)
    if plot:
        title = f"{spec.name} on {len(labelled)} configurations"
        try:
            parity_plot(result, plot, title=title)
        except ImportError:
            fail("--plot needs matplotlib: pip install 'molopt[plot]'")
    result.pop("_parity")
    if json:
        typer.echo(jsonlib.dumps(result, indent=1))
    else:
        errors_table(spec.name, result)


def _check_covered(spec, labelled) -> None:
    """PotentialError naming the data's elements that ``spec`` does not cover."""
    from molopt import elements as el

    missing = {int(z) for d in labelled for z in d.structure.numbers} - set(spec.elements or ())
    if spec.elements and missing:
        raise PotentialError(
            "element(s) "
            + ", ".join(el.symbol(z) for z in sorted(missing))
            + f" in the data are not covered by potential '{spec.name}'"
        )
