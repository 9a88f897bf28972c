"""``genperc data``: render, inspect and check the shapes world.

Commands raise :class:`genperc.errors.UserError` for user mistakes; the main CLI prints them as
one line and exits with code 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from genperc.atomic import ensure_writable_dir
from genperc.errors import UserError

app = typer.Typer(help="The shapes world: render, inspect and check procedurally rendered data.",
                  no_args_is_help=True, add_completion=False)

FIXTURE_DIR = Path("tests/fixtures/world")
# name → (config overrides, {split: scenes}); small enough to ship with the tests (< 2 MB).
FIXTURES = {
    "multi32": (dict(resolution=32), {"train": 16, "val": 8}),
    "multi64": (dict(resolution=64), {"val": 8}),
    "single32": (dict(resolution=32, single=True), {"train": 16, "val": 8}),
}


def _config(resolution, spp, min_objects, max_objects, single_object, min_pixels, label_scheme,
            shapes, variant, max_depth, world=None):
    from genperc.data.world.scene import WorldConfig

    overrides = {"variant": variant, "max_depth": max_depth}
    if resolution is not None:
        overrides["resolution"] = resolution
    if spp is not None:
        overrides["spp"] = spp
    if min_objects is not None:
        overrides["min_objects"] = min_objects
    if max_objects is not None:
        overrides["max_objects"] = max_objects
    if min_pixels is not None:
        overrides["min_pixels"] = min_pixels
    if label_scheme is not None:
        overrides["label_scheme"] = label_scheme
    if shapes is not None:
        overrides["shapes"] = tuple(s.strip() for s in shapes.split(",") if s.strip())
    if world is not None:
        if single_object:
            raise UserError("--world and --single-object are two designs", "pass one of them")
        return WorldConfig.preset(world, **overrides)
    return WorldConfig.single_object(**overrides) if single_object else WorldConfig(**overrides)


@app.command()
def render(
    out: Path = typer.Option(..., "--out", help="Output folder; the split goes to OUT/SPLIT/."),
    scenes: int = typer.Option(100, help="Number of scenes."),
    world: str = typer.Option(None, help="A named world design: clevr | demo | compact (genperc.data.world."
                                         "WORLD_PRESETS); the options below override it."),
    resolution: int = typer.Option(None, help="Image width and height in pixels (default 64, or the --world's)."),
    seed: int = typer.Option(0, help="Seed: same seed and options give byte-identical files."),
    split: str = typer.Option("train", help="train, val or test (each has its own random stream)."),
    workers: int = typer.Option(os.cpu_count() or 1, help="Worker processes (files do not depend on it)."),
    spp: int = typer.Option(None, help="Path-tracing samples per pixel (default 16, or the --world's)."),
    min_objects: int = typer.Option(None, help="Fewest objects per scene (default 3; 1 with --single-object)."),
    max_objects: int = typer.Option(None, help="Most objects per scene (default 8; 1 with --single-object)."),
    single_object: bool = typer.Option(False, "--single-object", help="One centred object per scene, labelled by class."),
    min_pixels: int = typer.Option(None, help="Visible pixels every object needs (default: CLEVR's fraction of the image, >= 4)."),
    label_scheme: str = typer.Option(None, help="Class labels: shape_color (default), shape, color, any _-joined subset of size/color/material/shape, count or none."),
    shapes: str = typer.Option(None, help="Comma-separated subset of cube,sphere,cylinder,cone."),
    variant: str = typer.Option("auto", help="Mitsuba variant: auto (cuda_ad_rgb with a GPU, else scalar_rgb), scalar_rgb, llvm_ad_rgb, cuda_ad_rgb."),
    max_depth: int = typer.Option(4, help="Longest light path of the path tracer."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Render (or resume) a split of the shapes world."""
    from genperc.data.world.render_job import render_split

    config = _config(resolution, spp, min_objects, max_objects, single_object, min_pixels,
                     label_scheme, shapes, variant, max_depth, world)
    manifest = render_split(out, config, split=split, scenes=scenes, seed=seed, workers=workers,
                            progress=progress)
    typer.echo(f"{scenes} scenes in {Path(out) / split} (variant {manifest['variant']}, "
               f"content sha256 {manifest['content_sha256'][:16]}…)")


@app.command()
def show(
    directory: Path = typer.Argument(..., help="A rendered world folder (or one split folder)."),
    index: int = typer.Option(0, "--index", "-i", help="Scene index within the split."),
    split: str = typer.Option("train", help="Split to read."),
    out: Path = typer.Option(None, "--out", help="PNG to write (default world_<split>_<index>.png)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip damaged scenes (the index counts the good ones)."),
):
    """Write a contact sheet of one scene: RGB, depth, instances, boxes, expressions."""
    from genperc.data.world.format import WorldSource
    from genperc.data.world.show import contact_sheet

    source = WorldSource(directory, split=split, skip_bad=skip_bad)
    out = out or Path(f"world_{source.split}_{index:06d}.png")
    ensure_writable_dir(out.parent, "--out folder")
    if not 0 <= index < len(source):
        raise UserError(f"--index {index} is out of range for {source.split_dir} ({len(source)} scenes)",
                        f"use 0..{len(source) - 1}")
    record = source[index]
    contact_sheet(record, out, title=f"{source.split_dir} #{record.meta['index']}",
                  categories=source.categories)
    if skip_bad and source.summary.skipped:
        typer.echo(f"skipped: {source.summary}")
    typer.echo(f"wrote {out}")


@app.command()
def check(
    directory: Path = typer.Argument(..., help="A rendered world folder (or one split folder)."),
    split: str = typer.Option("train", help="Split to check."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Report damaged scenes instead of failing."),
):
    """Validate a split: the hash chain (manifest → SHA256SUMS → annotations.jsonl → every file),
    every record's keys, every file's presence and decoding; print a summary."""
    from genperc.data.world.format import WorldSource, check_sums

    source = WorldSource(directory, split=split, skip_bad=True, progress=True)  # checks the hash chain
    check_sums(source)
    summary = source.summary
    if summary.skipped and not skip_bad:
        index, why = summary.bad[0]
        raise UserError(f"{summary.skipped} damaged scene(s), first #{index}: {why}",
                        "re-run the same `genperc data render` to repair, or pass --skip-bad")
    typer.echo(f"{source.split_dir}: {summary}")


@app.command()
def stats(
    directory: Path = typer.Argument(..., help="A rendered world folder (or one split folder)."),
    split: str = typer.Option("train", help="Split to read."),
    limit: int = typer.Option(None, help="Only the first N scenes."),
):
    """What the camera sees: farthest depth per image, visible pixels per object, object cover."""
    from genperc.data.world.format import WorldSource
    from genperc.data.world.show import split_statistics

    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit} is not positive", "use --limit 1 or more, or leave it out")
    s = split_statistics(WorldSource(directory, split=split), limit)
    typer.echo(f"{s['scenes']} scenes: farthest depth per image median {s['farthest_depth_median_m']:.1f} m, "
               f"p90 {s['farthest_depth_p90_m']:.1f} m; visible pixels per object median "
               f"{s['object_pixels_median']:.0f}, p10 {s['object_pixels_p10']:.0f}; objects cover "
               f"{100 * s['object_cover_mean']:.1f}% of the image")


@app.command()
def fixtures(
    out: Path = typer.Option(FIXTURE_DIR, "--out", help="Where the test fixture goes."),
    workers: int = typer.Option(os.cpu_count() or 1, help="Worker processes."),
):
    """Regenerate the small pre-rendered fixture shipped with the tests."""
    regenerate_fixtures(out, workers=workers)
    total = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    typer.echo(f"fixture in {out}: {total / 1e6:.2f} MB")


def regenerate_fixtures(out=FIXTURE_DIR, workers: int = 1, progress: bool = True) -> None:
    """Render every fixture split from scratch (seed 0, 16 spp, scalar_rgb)."""
    import shutil

    from genperc.data.world.render_job import render_split
    from genperc.data.world.scene import WorldConfig

    for name, (overrides, splits) in FIXTURES.items():
        overrides = dict(overrides, variant="scalar_rgb")
        single = overrides.pop("single", False)
        config = WorldConfig.single_object(**overrides) if single else WorldConfig(**overrides)
        for split, n in splits.items():
            shutil.rmtree(Path(out) / name / split, ignore_errors=True)
            render_split(Path(out) / name, config, split=split, scenes=n, seed=0, workers=workers,
                         progress=progress)
