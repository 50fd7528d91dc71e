"""``sandport image``: guest images of QEMU microVM sandboxes (build, list).

Owns the ``image`` group, its progress bars and its lines. Must not build anything
itself: :mod:`sandport.sandbox.images` does; and needs no gateway.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from sandport.cli.common import (
    err,
    json_flag,
    out,
    print_json,
    print_table,
    run_reporting,
    wide_flag,
)
from sandport.cli.help import HelpTyper
from sandport.cli.table import Column
from sandport.errors import UsageError
from sandport.sandbox import images as guest_images

image_app = HelpTyper(help="Guest images of QEMU microVM sandboxes: a Debian kernel and a "
                        "busybox initramfs per profile, made from the host's Debian packages.")

ImageCacheOption = Annotated[Path, typer.Option(help="The image cache directory.",
                                                metavar="DIR")]


def _mib(value: object) -> str:
    return f"{value / 2**20:.1f} MiB" if isinstance(value, int) else "-"


def _build_image(bar: Progress, profile: str, cache_dir: Path,
                 force: bool) -> tuple[guest_images.Image, float, bool]:
    """Build one image under a progress bar: (image, seconds, cached)."""
    task = bar.add_task(profile, total=None)
    steps: list[str] = []

    def report(step: str, fraction: float | None) -> None:
        steps.append(step)
        bar.update(task, description=f"{profile}: {step}",
                   total=None if fraction is None else 1.0, completed=fraction or 0.0)

    t0 = time.monotonic()
    try:
        image = guest_images.build_image(profile, cache_dir, force=force, progress=report)
    finally:
        bar.remove_task(task)
    return image, time.monotonic() - t0, "cached" in steps


@image_app.command("build")
def image_build(
    profile: Annotated[str, typer.Option(help="echo, desktop or all.",
                                         metavar="PROFILE")] = "all",
    cache_dir: ImageCacheOption = guest_images.DEFAULT_IMAGE_CACHE,
    force: Annotated[bool, typer.Option(
        "--force", help="Build even if the image for the current inputs exists.")] = False,
) -> None:
    """Build the image of each profile; at once ("cached") if its inputs are unchanged.

    An image's key hashes its inputs: the kernel apt would fetch now, the versions of the
    Debian packages its files come from, the init script. Prints one line per image:
    profile, key, sizes, seconds, built or cached, directory.
    """

    def run() -> None:
        choices = (*guest_images.IMAGE_PROFILES, "all")
        if profile not in choices:
            raise UsageError(f"--profile {profile!r} is not one of {', '.join(choices)}")
        profiles = guest_images.IMAGE_PROFILES if profile == "all" else (profile,)
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   TimeElapsedColumn())
        for name in profiles:
            # One bar per image, gone before its line is printed (stdout stays clean).
            with Progress(*columns, console=err, transient=True) as bar:
                image, seconds, cached = _build_image(bar, name, cache_dir.absolute(), force)
            sizes = image.manifest.get("sizes", {})
            out.print(f"{image.profile:<8} {image.key[:16]}  initramfs "
                      f"{_mib(sizes.get('initramfs'))}, vmlinux {_mib(sizes.get('vmlinux'))}"
                      f"  {seconds:.1f} s  {'cached' if cached else 'built'}  {image.dir}",
                      markup=False, crop=False, overflow="ignore")

    run_reporting(run)


@image_app.command("list")
def image_list(
    cache_dir: ImageCacheOption = guest_images.DEFAULT_IMAGE_CACHE,
    as_json: Annotated[bool, json_flag()] = False,
    wide: Annotated[bool, wide_flag()] = False,
) -> None:
    """Every image in the cache, current or not: profile, key, kernel, sizes, build time.

    `sandport image build` names the current image of each profile.
    """

    def run() -> None:
        found = guest_images.list_images(cache_dir.absolute())
        if as_json:
            docs = [{"profile": i.profile, "key": i.key, "dir": str(i.dir),
                     "kernel": str(i.kernel), "initrd": str(i.initrd), "manifest": i.manifest}
                    for i in found]
            print_json(docs)
            return
        if not found:
            err.print(escape(f"no images in {cache_dir}"))
            return
        columns = (Column(header="PROFILE"), Column(header="KEY"),
                   Column(header="KERNEL", rank=3), Column(header="INITRAMFS", rank=2),
                   Column(header="UNPACKED", rank=4), Column(header="BUILT", rank=5),
                   Column(header="DIR", rank=1))
        rows = []
        for i in found:
            sizes = i.manifest.get("sizes", {})
            rows.append((i.profile, i.key[:16], str(i.manifest.get("kernel_version", "-")),
                         _mib(sizes.get("initramfs")), _mib(sizes.get("unpacked")),
                         str(i.manifest.get("built_at", "-")), str(i.dir)))
        print_table(columns, rows, wide=wide)

    run_reporting(run)
