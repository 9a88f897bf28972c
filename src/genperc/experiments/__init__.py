"""Experiments that reproduce the papers' tables and measure runs: ``genperc experiment …`` (one typer sub-app)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Reproduce the papers' tables on local data (ADDP, GenRep, DDAE++); few-step sampling; learning curves.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

OVERRIDES_HELP = ("Dotted config overrides, e.g. train.batch_size=64 "
                  "task_options.genrep.posterior.steps=100")


@app.command("genrep")
def genrep_command(
    dataset: str = typer.Option("digits", help="digits (scikit-learn) or world (single-object shapes scenes)."),
    size: str = typer.Option("cpu", help="Experiment size: cpu (minutes, 16 px digits / 32 px world) or gpu."),
    seeds: int = typer.Option(3, help="Training seeds per variant (mean ± std)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default runs/genrep-<dataset>-<size>)."),
    tables: str = typer.Option("8,9,10,11,13,14", help="Which tables: any of 8,9,10,11,13,14."),
    world_path: str = typer.Option(None, help="A rendered world directory (default: render one into OUT/data)."),
    sweep_stages: str = typer.Option(None, help="Tables 9/10 runs: perception (stage 1 only) or full; "
                                                "default perception on cpu, full on gpu."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """GenRep Tables 8, 9, 10, 11, 13, 14 and the training-time overhead, as markdown (OUT/tables.md)."""
    from genperc.experiments.genrep import run_experiment


    out = out or Path("runs") / f"genrep-{dataset}-{size}"
    if seeds < 1:
        from genperc.errors import UserError

        raise UserError(f"--seeds {seeds} < 1", "use 1 or more seeds")
    run_experiment(dataset=dataset, size=size, seeds=seeds, out=out, tables=tables, overrides=list(overrides or []),
                   world_path=world_path, sweep_stages=sweep_stages, log=typer.echo)
    typer.echo(f"tables → {out / 'tables.md'}")


@app.command("ddae")
def ddae_command(
    dataset: str = typer.Option("digits", help="digits (scikit-learn) or world (single-object shapes scenes)."),
    preset: str = typer.Option("cpu", help="cpu (ddae-cpu, a UNet), dit-cpu (ddae-dit-cpu, a DiT), or any "
                                           "classification preset name or YAML path."),
    seeds: int = typer.Option(3, help="Training seeds per arm (mean ± std)."),
    only_seeds: str = typer.Option(None, help="Train only these seeds (comma-separated), e.g. to split the seeds "
                                              "over processes sharing one --out; the tables follow when all are done."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default runs/ddae-<dataset>-<preset>)."),
    world_path: str = typer.Option(None, help="A rendered single-object world with train/val (default: render one "
                                              "into OUT/data)."),
    probe_t: str = typer.Option("1,11,21,51,101", help="Probe noise levels, of 1,000 steps."),
    probe_views: int = typer.Option(8, help="Cached probe views (the clean one + augmented ones)."),
    probe_updates: int = typer.Option(5865, help="The probe's Adam updates at least (DDAE: 15 × 391)."),
    samples_per_class: int = typer.Option(25, help="Generated samples per class for FID / precision / recall."),
    sample_steps: int = typer.Option(50, help="DDPM steps of those samples."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """DDAE++: baseline, + self-conditioning, + self-conditioning + contrastive distillation at equal
    steps — FID / precision / recall, best linear-probe cell, training time (OUT/tables.md)."""
    from genperc.errors import UserError
    from genperc.experiments.ddae import run_experiment

    try:
        ts = [int(v) for v in probe_t.split(",") if v.strip()]
        only = [int(v) for v in only_seeds.split(",") if v.strip()] if only_seeds else None
    except ValueError:
        raise UserError("--probe-t / --only-seeds take comma-separated integers", "e.g. --probe-t 1,11,21") from None
    out = out or Path("runs") / f"ddae-{dataset}-{preset.replace('/', '_')}"
    run_experiment(dataset=dataset, preset=preset, seeds=seeds, out=out, overrides=list(overrides or []),
                   world_path=world_path, only_seeds=only, probe_t=ts, probe_views=probe_views, probe_updates=probe_updates,
                   samples_per_class=samples_per_class, sample_steps=sample_steps, log=typer.echo)


@app.command("ddae-select")
def ddae_select_command(
    preset: str = typer.Option("cpu", help="cpu (ddae-cpu), dit-cpu (ddae-dit-cpu), or any classification preset."),
    blocks: str = typer.Option(None, help="Candidate blocks, comma-separated (default: every block with a later "
                                          "block to condition)."),
    steps: int = typer.Option(200, help="Training steps of each short run."),
    window: int = typer.Option(50, help="Score: the mean training loss over the last WINDOW steps."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default runs/ddae-select-<preset>)."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """DDAE++'s choice of the self-conditioning block: one short run per candidate block, the lowest
    training loss wins (OUT/selection.json); pass the winner as model.self_conditioning.block=…"""
    from genperc.config import load_config
    from genperc.experiments.ddae import PRESETS
    from genperc.training.layer_selection import select_block

    cfg = load_config(PRESETS.get(preset, preset), list(overrides or []))
    out = out or Path("runs") / f"ddae-select-{preset.replace('/', '_')}"
    sel = select_block(cfg, out, [b.strip() for b in blocks.split(",") if b.strip()] if blocks else None,
                       steps=steps, window=window)
    for name, loss in sorted(sel.losses.items(), key=lambda kv: kv[1]):
        typer.echo(f"  {name:<8} {loss:.5f}" + ("  ← chosen" if name == sel.best else ""))
    typer.echo(f"chosen: model.self_conditioning.block={sel.best} (mean loss of the last {window} of {steps} "
               f"steps; {out / 'selection.json'})")


@app.command("addp")
def addp_command(
    task: str = typer.Option("referring", help="referring (InstructPix2Pix-style) or depth (Marigold-style)."),
    size: str = typer.Option("cpu", help="Experiment size: cpu (32 px, ~1 h on 2 cores) or gpu (64 px, one device, "
                                         "~10 min)."),
    seeds: int = typer.Option(3, help="Training seeds per run (mean ± std)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default runs/addp-<task>-<size>)."),
    strategies: str = typer.Option("uniform,loss-diffusion,prob-diffusion,prob-perception",
                                   help="Table 5 rows; prob-authors adds the authors' released c² table."),
    intensities: str = typer.Option("0,0.5,1,2", help="Fig. 8 augmentation intensities on the best strategy "
                                                      "('' skips part b)."),
    world_path: str = typer.Option(None, help="A rendered world with train/val/test (default: render into OUT/data)."),
    workers: int = typer.Option(None, help="Runs trained in parallel processes (default: the size's; 1 on a GPU)."),
    threads: int = typer.Option(None, help="torch threads per worker process (default: the size's; 0 = the process's, i.e. "
                                           "`genperc --threads`)."),
    discriminative: bool = typer.Option(True, "--discriminative/--no-discriminative",
                                        help="Also train the discriminative counterpart (model.mode=discriminative, "
                                             "one forward pass) at every seed, an anchor row of the tables."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """ADDP Table 5 (timestep strategies), Fig. 8 (augmentation intensity) and Fig. 7 (per-step
    curves before/after), as markdown (OUT/tables.md) and figures, beside their anchors on the same
    test items: the discriminative counterpart and the task's trivial baselines."""
    from genperc.experiments.addp import run_experiment

    out = out or Path("runs") / f"addp-{task}-{size}"
    run_experiment(task=task, size=size, seeds=seeds, out=out, strategies=strategies, intensities=intensities,
                   overrides=list(overrides or []), world_path=world_path, workers=workers, threads=threads,
                   discriminative=discriminative, log=typer.echo)
    typer.echo(f"tables → {out / 'tables.md'}")


@app.command("sampling")
def sampling_command(
    runs: list[Path] = typer.Argument(..., help="Run directories written by `genperc train`."),
    steps: str = typer.Option("1,4,10,50", help="Sampling step counts, comma-separated."),
    spacings: str = typer.Option("trailing,leading", help="Timestep spacings, comma-separated: leading | trailing | "
                                                          "linspace."),
    limit: int = typer.Option(None, help="Evaluate only the first N items of the split (default: all)."),
    sampler: str = typer.Option("ddim", help="ddim (Marigold v1.1's, η 0) | euler-a | ddpm."),
    split: str = typer.Option("val", help="Split of each run's data."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default runs/sampling)."),
    seed: int = typer.Option(0, help="Seed of the sampling noise."),
):
    """Few-step perception: each run's headline metrics and seconds per image at every steps ×
    spacing (ensemble 1, the run's guidance): OUT/sampling.csv and OUT/tables.md."""
    from genperc.experiments.sampling import run_experiment

    out = out or Path("runs") / "sampling"
    tables = run_experiment(list(runs), out, steps=steps, spacings=spacings, sampler=sampler, split=split,
                            limit=limit, seed=seed, log=typer.echo)
    typer.echo(tables)
    typer.echo(f"tables → {out / 'tables.md'}, rows → {out / 'sampling.csv'}")


@app.command("curves")
def curves_command(
    preset: str = typer.Option("cpu-tiny", help="Config preset name or path to a YAML file (as `genperc train`)."),
    modes: str = typer.Option("generative,discriminative", help="model.mode values to train, comma-separated: "
                                                               "generative | discriminative (ADDP Table 2's counterpart)."),
    seeds: int = typer.Option(3, help="Training seeds per mode (train.seed + 0, 1, …; mean ± std)."),
    steps: int = typer.Option(None, help="Training steps per run (default: the preset's train.steps)."),
    every: int = typer.Option(None, help="Score a checkpoint every K steps, and the last (default: the preset's "
                                         "train.checkpoint_every)."),
    split: str = typer.Option("val", help="Held-out split of the data the checkpoints are scored on."),
    limit: int = typer.Option(None, help="Score only the first N items of the split (default: all)."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (default runs/curves-<preset>)."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also score the task's trivial "
                                   "baselines on the same items (dashed lines, table rows)."),
    baseline_fit_items: int = typer.Option(500, help="Training items the baselines are fitted on (at most)."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """Learning curves (issue 12): the held-out metrics of every mode × seed against training steps,
    with the baselines: OUT/curves.csv, curves.png, tables.md, results.json. Resumable."""
    from genperc.experiments.curves import run_experiment

    out = out or Path("runs") / f"curves-{Path(preset).stem}"
    run_experiment(preset, list(overrides or []), modes=modes, seeds=seeds, steps=steps, every=every, split=split,
                   limit=limit, out=out, baselines=baselines, baseline_fit_items=baseline_fit_items, log=typer.echo)
    typer.echo(f"rows → {out / 'curves.csv'}, plot → {out / 'curves.png'}, tables → {out / 'tables.md'}, "
               f"results → {out / 'results.json'}")


@app.command("genrep-train")
def genrep_train_command(
    preset: str = typer.Option("genrep-cpu", help="Config preset (task classification with task_options.genrep)."),
    run_dir: Path = typer.Option(Path("runs/genrep"), "--run-dir", "-o", help="Output run directory."),
    evaluate: bool = typer.Option(True, help="Evaluate the unified model on data.val_split afterwards."),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
):
    """Train one GenRep model: generator (unless stages.pretrained), stage 1 and stage 2, in one command."""
    import json

    from genperc import build
    from genperc.config import load_config
    from genperc.diffusion.schedule import NoiseSchedule
    from genperc.training.genrep import GenRepConfig, open_split, train_genrep

    cfg = load_config(preset, list(overrides or []))
    if cfg.task != "classification":
        from genperc.errors import UserError

        raise UserError(f"GenRep trains the classification task, the config has task={cfg.task}",
                        "use --preset genrep-cpu or set task=classification")
    res = train_genrep(cfg, run_dir, log=typer.echo)
    if evaluate:
        from genperc.evaluation.genrep import FeatureExtractor, evaluate_genrep, train_feature_net

        gcfg = GenRepConfig.from_run(cfg)
        task = build.build_task(cfg)
        train_ds = task.dataset(open_split(cfg, cfg.data.train_split), cfg.data.resolution)
        eval_ds = task.dataset(open_split(cfg, cfg.data.val_split), cfg.data.resolution)
        fe = gcfg.eval.feature_extractor
        extractor = (FeatureExtractor(torchscript=fe.split(":", 1)[1]) if fe.startswith("torchscript:")
                     else FeatureExtractor(train_feature_net(train_ds, task.num_classes, seed=0)))
        metrics = evaluate_genrep(res.model, eval_ds, schedule=NoiseSchedule(cfg.diffusion),
                                  num_classes=task.num_classes, cfg=gcfg.eval, extractor=extractor,
                                  out_dir=run_dir / "eval", names=task.class_names)
        (run_dir / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=1))
        typer.echo(json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)}, indent=1))
    typer.echo(f"GenRep model → {run_dir / 'stage2' if res.semantic is not None else run_dir / 'stage1'}")
