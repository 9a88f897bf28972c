"""The ``genperc`` command. Thin: parse, call the library, print.

Every user error (:class:`genperc.errors.UserError`) is printed as one line with the fix and exits
with code 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from genperc.errors import UserError

app = typer.Typer(
    help="genperc: diffusion models as perception models (ADDP, GenRep, DDAE++).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


_MOUNTED = False


def _mount_subapps() -> None:
    """Attach the command groups that live beside their library code (once per process)."""
    global _MOUNTED
    if _MOUNTED:
        return
    _MOUNTED = True
    from genperc.data.commands import app as data_app

    app.add_typer(data_app, name="data", help="Render, inspect and check data sets (the shapes world).")


OVERRIDES_HELP = "Dotted config overrides, e.g. train.lr=3e-4 model.preset=unet-small"


@app.command()
def train(
    preset: str = typer.Option("cpu-tiny", help="Config preset name or path to a YAML file (see `genperc presets`)."),
    task: str = typer.Option(None, help="Task: referring (more with later releases). Overrides the preset's task."),
    run_dir: Path = typer.Option(None, "--run-dir", "-o", help="Output run directory (default runs/<task>-<preset>)."),
    resume: bool = typer.Option(False, help="Continue from the run directory's latest checkpoint."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """Train a denoiser for a task with the one trainer."""
    from genperc.config import load_config, load_run_config
    from genperc.training.trainer import Trainer

    extra = list(overrides or []) + ([f"task={task}"] if task else [])
    if resume:
        if run_dir is None:
            raise UserError("--resume needs --run-dir", "pass the run directory to continue")
        cfg = load_run_config(run_dir)
        if extra:
            cfg = load_config(base=cfg.to_dict(), overrides=extra)
    else:
        cfg = load_config(preset, extra)
    run_dir = run_dir or Path("runs") / f"{cfg.task}-{Path(preset).stem}"
    result = Trainer(cfg, run_dir).train(resume=resume)
    typer.echo(f"trained {result.step} steps, final loss {result.loss:.4f}, "
               f"{result.images_per_s:.1f} images/s → {result.run_dir}")


@app.command()
def presets():
    """List the config presets shipped with genperc."""
    from genperc.config import PRESET_DIR, list_presets

    for name in list_presets():
        first = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        typer.echo(f"{name:<16} {first}")


@app.command()
def config(
    preset: str = typer.Option("cpu-tiny", help="Preset name or YAML path."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """Print the resolved config of a preset with overrides (YAML)."""
    import yaml

    from genperc.config import load_config

    typer.echo(yaml.safe_dump(load_config(preset, list(overrides or [])).to_dict(), sort_keys=False))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Output directory."),
    minutes: float = typer.Option(1.0, help="Training time budget in minutes."),
    preset: str = typer.Option("cpu-tiny", help="Config preset."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """The main job on the embedded default: train, evaluate, report what was learned."""
    from genperc.demo import run_demo

    run_demo(out, minutes=minutes, preset=preset, overrides=list(overrides or []))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one line and exit code 2 for user errors."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _mount_subapps()
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        return 130
    except SystemExit as e:  # click's own exits (e.g. --help)
        return int(e.code or 0)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
