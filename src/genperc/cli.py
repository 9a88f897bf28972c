"""The ``genperc`` command. Thin: parse, call the library, print.

Every user error (:class:`genperc.errors.UserError`) is printed as one line with the fix and exits
with code 2, without a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from genperc.atomic import ensure_writable_dir
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
    from genperc.analyze import app as analyze_app

    app.add_typer(analyze_app, name="analyze", help="ADDP analyses: per-step curves, contribution factors c_t², augmentation figures.")
    from genperc.experiments import app as experiment_app

    experiment_app.command("correct")(_experiment_correct)
    app.add_typer(experiment_app, name="experiment", help="Reproduce the papers' tables (ADDP, GenRep); few-step sampling.")


def _experiment_correct(
    runs: list[Path] = typer.Argument(..., help="Referring run directories, one per training seed (mean ± std)."),
    out: Path = typer.Option(Path("runs/addp-correct"), "--out", "-o", help="Output directory (tables.md)."),
    split: str = typer.Option("test", help="Held-out split of the runs' data."),
    limit: int = typer.Option(160, help="Expressions per run (the split's first N)."),
    rounds: int = typer.Option(3, help="Oracle rounds (1 → 2 → 3)."),
    grid: str = typer.Option(None, help="(w_D, w_D⁻) cells at oracle round 2, w_D:w_D⁻ comma-separated (default: "
                             "1.5:1,1.5:1.5,3:1,3:3,5:1,5:5,1.5:3,3:0 — w_D = w_D⁻ is each w_D's uncorrected anchor, "
                             "w_D < w_D⁻ crosses the paper's recommendation)."),
    agent: bool = typer.Option(True, "--agent/--no-agent", help="Also correct with the agent."),
    k: int = typer.Option(3, help="Confusers the agent corrects and votes over."),
    captioner: str = typer.Option("scene", help="Agent captioner: scene | transformers:DIR | openai:URL#MODEL."),
    language_model: str = typer.Option("minilm", help="Agent language model: minilm | transformers:DIR | "
                                       "openai:URL#MODEL."),
    seed: int = typer.Option(0, help="Seed of the sampling noise (every round reuses it)."),
):
    """ADDP Table 3: the model alone vs + correctional guidance by the agent and by an oracle user
    (rounds, weight grid), by expression family, with the cost per image."""
    from genperc.interactive.benchmark import DEFAULT_GRID, parse_grid, run_table3

    cells = DEFAULT_GRID if grid is None else parse_grid(grid)
    path = run_table3(runs, out, split=split, limit=limit, rounds=rounds, grid=cells, agent=agent, k=k,
                      seed=seed, captioner=captioner, language_model=language_model)
    typer.echo(path.read_text())
    typer.echo(f"wrote {path}")


@app.callback()
def _options(threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = the cores this process may "
                                                                "run on); never chosen by timing, so a seed gives "
                                                                "the same numbers on a busy or a quiet machine.")):
    from genperc import runtime

    runtime.configure_threads(threads or None, announce=False)  # printed by the commands that compute


OVERRIDES_HELP = "Dotted config overrides, e.g. train.lr=3e-4 model.arch=unet-small"
SPACING_HELP = ("Sampling timestep spacing: leading | trailing | linspace (default: the run's "
                "diffusion.timestep_spacing); trailing with 1-4 DDIM steps is Marigold v1.1's.")


@app.command()
def train(
    preset: str = typer.Option("cpu-tiny", help="Config preset name or path to a YAML file (see `genperc presets`)."),
    task: str = typer.Option(None, help="Task: depth | referring | generalist. Overrides the preset's task."),
    run_dir: Path = typer.Option(None, "--run-dir", "-o", help="Output run directory (default runs/<task>-<preset>)."),
    resume: bool = typer.Option(False, help="Continue from the run directory's newest intact checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace the run the directory holds (its checkpoints, metrics, "
                                   "TensorBoard log and config are removed first)."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """Train a denoiser for a task with the one trainer. A directory that holds a run is continued
    only with --resume and replaced only with --overwrite; it is locked while training."""
    from genperc.config import load_config, load_run_config
    from genperc.training.trainer import Trainer, check_claim

    extra = list(overrides or []) + ([f"task={task}"] if task else [])
    if run_dir is not None:
        check_claim(run_dir, resume, overwrite)  # before building anything; checked again under the lock
    if resume:
        if run_dir is None:
            raise UserError("--resume needs --run-dir", "pass the run directory to continue")
        cfg = load_run_config(run_dir)
        if extra:
            cfg = load_config(base=cfg.to_dict(), overrides=extra)
    else:
        cfg = load_config(preset, extra)
    if run_dir is None:
        run_dir = Path("runs") / f"{cfg.task}-{Path(preset).stem}"
        check_claim(run_dir, resume, overwrite)
    ensure_writable_dir(run_dir, "run directory")
    result = Trainer(cfg, run_dir).train(resume=resume, overwrite=overwrite)
    typer.echo(f"trained {result.step} steps, final loss {result.loss:.4f}, "
               f"{result.images_per_s:.1f} images/s → {result.run_dir}")


@app.command("eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="A run directory written by `genperc train`."),
    split: str = typer.Option("val", help="Split of the run's data to evaluate."),
    steps: int = typer.Option(None, help="Sampling steps (default: the run's sample.steps)."),
    sampler: str = typer.Option(None, help="ddim | euler-a | ddpm (default: the run's sample.sampler)."),
    spacing: str = typer.Option(None, help=SPACING_HELP),
    ensemble: int = typer.Option(1, help="Test-time ensemble size (Marigold-style for depth)."),
    limit: int = typer.Option(None, help="Evaluate only the first N items."),
    seed: int = typer.Option(0, help="Seed of the sampling noise."),
    text_scale: float = typer.Option(None, help="InstructPix2Pix text guidance s_T (default: the run's)."),
    image_scale: float = typer.Option(None, help="InstructPix2Pix image guidance s_I (default: the run's)."),
    batch_size: int = typer.Option(None, help="Items per sampler call."),
    weights: str = typer.Option("ema", help="ema | model."),
    checkpoint: str = typer.Option(None, help="A kept checkpoint: its step (e.g. 500) or folder (default: the "
                                   "newest intact one)."),
    resolution: str = typer.Option(None, help="model | ground-truth: score at the model's resolution or, as "
                                   "Marigold does, upsampled to the ground truth's (depth; default: the task's)."),
    out: Path = typer.Option(None, help="Output folder (default RUN/eval/<split>-<checkpoint>)."),
    baselines: bool = typer.Option(False, "--baselines", help="Also score the task's trivial baselines on the "
                                   "same items (fitted on the run's training split); printed under the model's "
                                   "metrics and written to metrics.json under \"baselines\"."),
    baseline_fit_items: int = typer.Option(500, help="Training items the baselines are fitted on (at most)."),
    correction: str = typer.Option("none", help="none | oracle | agent: also correct each prediction with ADDP's "
                                   "correctional guidance (referring; ADDP Table 3), D⁻ from an oracle user "
                                   "(the object the mask wrongly covers) or the agent."),
    rounds: int = typer.Option(2, help="Rounds with --correction oracle (1 = the model alone)."),
    captioner: str = typer.Option("scene", help="--correction agent: scene | transformers:DIR | openai:URL#MODEL."),
    language_model: str = typer.Option("minilm", help="--correction agent: minilm | transformers:DIR | "
                                       "openai:URL#MODEL."),
    agent_k: int = typer.Option(3, help="--correction agent: confusers corrected and voted over."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides of the run's config, e.g. data.path=… task_options.threshold=40"),
):
    """Evaluate a trained run: metrics.json (summary, settings, machine) and a per-sample CSV.

    The output folder is created and locked (one evaluation writes into it at a time) before the
    evaluation starts; the run itself is only read, so a run may be evaluated while it trains."""
    from genperc import runlock
    from genperc.inference import evaluate_run, load_run

    run = load_run(run_dir, weights=weights, overrides=list(overrides or []), checkpoint=checkpoint)
    out = out or run_dir / "eval" / f"{split}-{run.checkpoint.name}"
    ensure_writable_dir(out, "--out folder")  # before evaluating
    with runlock.locked(out, "genperc eval"):
        if correction != "none":
            return _eval_corrections(run, split, out, correction=correction, rounds=rounds, limit=limit, seed=seed,
                                     w_d=text_scale, w_i=image_scale, captioner=captioner,
                                     language_model=language_model, k=agent_k)
        evaluation = evaluate_run(run, split, steps=steps, sampler=sampler, spacing=spacing, ensemble=ensemble,
                                  limit=limit, seed=seed, batch_size=batch_size, text_scale=text_scale,
                                  image_scale=image_scale, out=out, resolution=resolution, progress=True,
                                  baselines=baselines, baseline_fit_items=baseline_fit_items)
        settings = evaluation.settings
        how = (f"discriminative, {settings['forward']}" if settings.get("mode") == "discriminative" else
               f"{settings['sampler']} {settings['steps']} {settings['spacing']} steps, ensemble {settings['ensemble']}")
        typer.echo(f"{run.task.name} on {split} ({settings['items']} items, {how}, at {settings['resolution']} resolution, "
                   f"{settings['seconds']:.0f} s):")
        for name, value in evaluation.summary.items():
            typer.echo(f"  {name:<28} {value:.4f}" if isinstance(value, float) else f"  {name:<28} {value}")
        if baselines:
            _echo_baselines(run.task, evaluation, settings)
        typer.echo("settings: " + ", ".join(f"{k}={v}" for k, v in settings["task_settings"].items()))
        typer.echo(f"wrote {out / 'metrics.json'} and {out / 'samples.csv'}")


def _eval_corrections(run, split, out, **options) -> None:
    """``genperc eval --correction``: rounds scored per family, written as corrections.json/.csv."""
    from genperc.interactive.benchmark import evaluate_corrections

    if options["correction"] not in ("oracle", "agent"):
        raise UserError(f"unknown --correction {options['correction']!r}", "use none, oracle or agent")
    result = evaluate_corrections(run, split, progress=True, **options)
    summary = result.summary()
    typer.echo(f"{run.task.name} on {split} ({len(result.rows)} expressions, correction by the "
               f"{options['correction']}, {result.settings['seconds']:.0f} s):")
    for arm in result.arms():
        typer.echo(f"  {arm:<10} oIoU {summary[f'{arm}/oIoU']:.4f}  mIoU {summary[f'{arm}/mIoU']:.4f}  "
                   f"{summary[f'{arm}/calls']:.0f} denoiser calls / image")
    typer.echo(f"wrote {result.write(out)}")


def _echo_baselines(task, evaluation, settings) -> None:
    """The model's and the baselines' main and headline metrics, one row per predictor."""

    rows = {"model": evaluation.summary, **evaluation.baselines}
    cols = [m for m in task.headline_metrics() if any(m in s for s in rows.values())]
    width = max(len(name) for name in rows) + 2
    fit = settings["baselines"]
    typer.echo(f"baselines on the same {settings['items']} items (fitted on up to {fit['fit_items']} items of "
               f"the {fit['fit_split']} split):")
    typer.echo("  " + "predictor".ljust(width) + "".join(f"{m:>{max(len(m), 8) + 2}}" for m in cols))
    for name, summary in rows.items():
        cells = []
        for m in cols:
            v = summary.get(m)
            cells.append(f"{('—' if v is None else f'{v:.4f}'):>{max(len(m), 8) + 2}}")
        typer.echo("  " + name.ljust(width) + "".join(cells))


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory written by `genperc train`."),
    image: Path = typer.Option(..., "--image", help="An 8-bit RGB image (PNG/JPEG); resized to the model's size."),
    prompt: str = typer.Option(None, help="Referring expression or generalist instruction (not used by depth)."),
    out: Path = typer.Option(Path("prediction"), help="Output folder."),
    steps: int = typer.Option(None, help="Sampling steps (default: the run's sample.steps)."),
    sampler: str = typer.Option(None, help="ddim | euler-a | ddpm."),
    spacing: str = typer.Option(None, help=SPACING_HELP),
    ensemble: int = typer.Option(1, help="Test-time ensemble size."),
    seed: int = typer.Option(0, help="Seed of the sampling noise."),
    weights: str = typer.Option("ema", help="ema | model."),
    correct: list[str] = typer.Option(None, "--correct", help="A negative description D⁻ to guide away from (ADDP "
                                      "Eq. 5, referring); repeat for several (their mean is used)."),
    w_d: float = typer.Option(None, "--w-d", help="w_D: guidance towards the prompt (default: the run's text scale)."),
    w_dminus: float = typer.Option(1.0, "--w-dminus", help="w_D⁻: weight of the negative branch (the paper "
                                   "recommends w_D > w_D⁻)."),
    w_i: float = typer.Option(None, "--w-i", help="w_I: image guidance (default: the run's image scale)."),
    checkpoint: str = typer.Option(None, help="A kept checkpoint: its step (e.g. 500) or folder (default: the "
                                   "newest intact one)."),
):
    """Predict on one image: depth (16-bit PNG), mask (PNG) or boxes (JSON), plus visualisations."""
    from genperc.inference import load_run, predict_files

    ensure_writable_dir(out, "--out folder")  # before sampling
    run = load_run(run_dir, weights=weights, checkpoint=checkpoint)
    paths, notes = predict_files(run, image, out, prompt, seed=seed, steps=steps, sampler=sampler, spacing=spacing,
                                 ensemble=ensemble, text_scale=w_d, image_scale=w_i, negatives=correct,
                                 negative_scale=w_dminus)
    for note in notes:
        typer.echo(f"note: {note}")
    for path in paths:
        typer.echo(f"wrote {path}")


@app.command()
def serve(
    run_dir: Path = typer.Argument(..., help="A referring run directory written by `genperc train`."),
    host: str = typer.Option("127.0.0.1", help="Address to serve on (127.0.0.1: this machine only)."),
    port: int = typer.Option(7860, help="Port to serve on."),
    split: str = typer.Option("test", help="Split of the run's data whose scenes the page offers."),
    steps: int = typer.Option(None, help="Sampling steps (default: the run's sample.steps)."),
    weights: str = typer.Option("ema", help="ema | model."),
    captioner: str = typer.Option("scene", help="The agent's captioner."),
    language_model: str = typer.Option("minilm", "--language-model", help="The agent's language model."),
):
    """The web page of ADDP §3.3: predict while watching the denoising, correct by typing or
    clicking the wrongly chosen object, run the agent (a Gradio app, local and offline)."""
    from genperc.interactive.web import serve as serve_page

    serve_page(run_dir, host=host, port=port, split=split, steps=steps, weights=weights, captioner=captioner,
               language_model=language_model)


@app.command()
def probe(
    run_dir: Path = typer.Argument(..., help="A run directory written by `genperc train`."),
    dataset: str = typer.Option(None, help="digits | world:PATH | cifar10:PATH | cifar100:PATH | folder:PATH "
                                "(default: the run's own data, its train and val splits)."),
    t: str = typer.Option(None, "--t", help="Noise levels, comma-separated, in the run's timesteps (default: DDAE's "
                          "best, 11 of 1000 for a UNet, 121 for a DiT; with --grid 1,11,21,51,101,201 of 1000)."),
    block: str = typer.Option(None, "--block", help="Blocks, comma-separated (default: all; see the error of an "
                              "unknown name for the list), e.g. up0,mid or blk13."),
    grid: bool = typer.Option(False, "--grid", help="Probe every block at DDAE's grid of noise levels."),
    cache: bool = typer.Option(False, "--cache", help="Extract training features once, --cache-draws views "
                               "(clean + augmented), instead of fresh every epoch (DDAE's default): far faster."),
    cache_draws: int = typer.Option(1, help="With --cache: views cached (the clean one + augmented ones)."),
    epochs: int = typer.Option(15, help="Probe epochs (DDAE: 15), grown to reach --min-updates."),
    min_updates: int = typer.Option(5865, help="Adam updates at least (DDAE: 15 × 391 on CIFAR-10); 0 = epochs."),
    batch_size: int = typer.Option(128, help="Probe batch size (DDAE: 128)."),
    limit: int = typer.Option(None, help="At most this many items per split (a seeded subset)."),
    seed: int = typer.Option(0, help="Seed of the probe's initialisation, batches, crops and noise."),
    weights: str = typer.Option("ema", help="ema | model."),
    checkpoint: str = typer.Option(None, help="A kept checkpoint: its step or folder (default: the newest)."),
    out: Path = typer.Option(None, help="Output folder (default RUN/probe/<dataset>-<checkpoint>)."),
):
    """DDAE's linear probe of a frozen denoiser's block features (top-1 per noise level and block);
    writes probe.csv, probe.json and a heat map probe.png."""
    from genperc.experiments.probe import ProbeConfig, default_out, probe_run

    try:
        timesteps = [int(v) for v in t.split(",") if v.strip()] if t else None
    except ValueError:
        raise UserError(f"--t {t!r} is not a list of integers", "e.g. --t 11 or --t 1,11,21") from None
    out = out or default_out(run_dir, dataset, checkpoint)
    result = probe_run(run_dir, dataset, timesteps=timesteps, blocks=block.split(",") if block else None, grid=grid,
                       out=out, limit=limit, weights=weights, checkpoint=checkpoint, progress=True,
                       config=ProbeConfig(epochs=epochs, batch_size=batch_size, cache=cache, seed=seed,
                                          cache_draws=cache_draws, min_updates=min_updates))
    s = result.settings
    typer.echo(f"linear probe of {run_dir} on {s['dataset']} ({s['train_items']} train / {s['test_items']} test, "
               f"{s['classes']} classes, {s['noise']} noise, {s['updates']} updates, {s['seconds']:.0f} s), top-1:\n{result.format()}")
    typer.echo(f"wrote {out / 'probe.csv'}, {out / 'probe.json'} and {out / 'probe.png'}")


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
    out: Path = typer.Option(Path("demo"), help="Output directory (report.html, metrics.json, run/, world/)."),
    steps: int = typer.Option(None, help="Training steps (default 1500: ~8 min on 2 quiet CPU cores with bf16). "
                                         "Steps, not time, are the budget: a seed gives the same model anywhere."),
    minutes: float = typer.Option(None, help="Also stop training after this many minutes (machine-dependent: a "
                                             "busy machine trains fewer steps and gives a different model)."),
    seed: int = typer.Option(0, help="Seed of the rendered world and of the evaluation's sampling noise."),
    preset: str = typer.Option("demo", help="Config preset."),
    train_scenes: int = typer.Option(2000, help="Rendered training scenes (32x32)."),
    val_scenes: int = typer.Option(12, help="Rendered held-out scenes."),
    limit: int = typer.Option(240, help="Held-out expressions to evaluate (0 = all)."),
    examples: int = typer.Option(9, help="Held-out scenes to predict on for the report's grid."),
    workers: int = typer.Option(2, help="Render worker processes."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """The main job on the embedded default: render a world, train referring segmentation, evaluate
    it beside two trivial baselines, predict, and write OUT/report.html."""
    from genperc.demo import DEMO_STEPS, run_demo

    run_demo(out, steps=steps or DEMO_STEPS, minutes=minutes, preset=preset, overrides=list(overrides or []),
             train_scenes=train_scenes, val_scenes=val_scenes, eval_limit=limit or None, examples=examples,
             workers=workers, seed=seed)


@app.command()
def pretrain(
    out: Path = typer.Option(Path("runs/world-generator"), "--out", "-o",
                             help="Output directory: world/, run/ and generator/ (the diffusers UNet to fine-tune from)."),
    steps: int = typer.Option(None, help="Training steps (default: the preset's)."),
    world: str = typer.Option("compact", help="World design to render (genperc.data.world.WORLD_PRESETS): "
                                              "clevr | demo | compact."),
    world_path: Path = typer.Option(None, help="Train on an already rendered world (a folder with train/) instead."),
    train_scenes: int = typer.Option(4000, help="Training scenes to render."),
    seed: int = typer.Option(0, help="Seed of the rendered world and of training."),
    preset: str = typer.Option("world-generator", help="Config preset of the text-to-image run."),
    workers: int = typer.Option(2, help="Render worker processes."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """Pretrain a world generator (text-to-image on scene captions), the Stable Diffusion stand-in:
    fine-tune any preset from it with model.pretrained=OUT/generator."""
    from genperc.pretrain import pretrain as run_pretrain

    record = run_pretrain(out, steps=steps, world=world, world_path=world_path, train_scenes=train_scenes, seed=seed,
                          preset=preset, overrides=list(overrides or []), workers=workers)
    overlap = record.get("val_colour_overlap")
    typer.echo(f"generator → {out / 'generator'} (sha256 {record['unet_sha256']})"
               + (f"; held-out colour overlap {overlap:.3f}" if overlap is not None else ""))


def _click_errors() -> tuple[type, ...]:
    """The usage-error base classes: typer ≥ 0.2x bundles its own click (``typer._click``), whose
    ``ClickException`` is not the installed click's; catch both so that no usage error escapes."""
    classes = []
    try:
        from typer._click.exceptions import ClickException as Bundled

        classes.append(Bundled)
    except ImportError:  # an older typer on the installed click
        pass
    import click

    classes.append(click.exceptions.ClickException)
    return tuple(classes)


def _show_click_error(e) -> int:
    """Click's usage errors as one line (``error: …`` and where to read the usage), exit code 2;
    a bare group (``genperc``, ``genperc data``) prints its help, as click does, and exits 2."""
    if type(e).__name__ == "NoArgsIsHelpError":
        e.show()
        return 2
    ctx = getattr(e, "ctx", None)
    hint = f" — see '{ctx.command_path} --help'" if ctx is not None else ""
    typer.echo(f"error: {e.format_message()}".replace("\n", " ") + hint, err=True)
    return 2 if getattr(e, "exit_code", 1) in (1, 2) else e.exit_code


def _interrupted() -> int:
    typer.echo("interrupted", err=True)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one line and exit code 2 for user and usage errors, 130 when interrupted.

    ``standalone_mode=False`` makes typer return the exit code of a ``typer.Exit`` (Ctrl-C inside a
    command arrives as ``Exit(130)``) instead of calling ``sys.exit``; that code is returned here.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _mount_subapps()
    try:
        code = app(args=argv, prog_name="genperc", standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except (typer.Abort, KeyboardInterrupt):
        return _interrupted()
    except SystemExit as e:  # sys.exit inside a command
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except _click_errors() as e:
        return _show_click_error(e)
    code = code if isinstance(code, int) and not isinstance(code, bool) else 0
    return _interrupted() if code == 130 else code


if __name__ == "__main__":
    sys.exit(main())
