"""What every command shares: the consoles, the options and option blocks, escaping and progress bars.

Anything a user controls (paths, reasons, filters, error messages) reaches rich through `esc` or as a
`Text`, never as markup: a file named `[bold]` must print as `[bold]`, and `[/b]` must not crash.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Optional, get_type_hints

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

out = Console()
err = Console(stderr=True)

DEFAULT_DB = Path("simsearch.db")
DbOption = Annotated[Path, typer.Option("--db", help="Database directory.", envvar="SIMSEARCH_DB")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
RuntimeOption = Annotated[str, typer.Option("--runtime", help="How the model runs: auto (measured once per machine), torch, torch-bf16 or onnx.")]
ModelOption = Annotated[Optional[str], typer.Option("--model", help="Registry name, hub id or local directory.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
OutOption = Annotated[Optional[Path], typer.Option("--out", help="Also write the JSON here.")]
CacheOption = Annotated[Optional[Path], typer.Option(help="Keep descriptors in this database between runs.")]
MetricsOption = Annotated[str, typer.Option("--metric", help="aas, cosine, style, or all (comma-separated).")]
# diffusion backbones (index, score, bench): what the UNet sees
TimestepOption = Annotated[Optional[int], typer.Option(help="Stable Diffusion: DDPM timestep of the noise (DiffSim's step 900 = t 101).")]
NoiseSeedOption = Annotated[Optional[int], typer.Option(help="Stable Diffusion: seed of the one fixed noise tensor.")]
IpAdapterOption = Annotated[Optional[str], typer.Option(help="Stable Diffusion: IP-Adapter Plus folder or hub id (DiffSim-C).")]
# dense correspondence settings (match, bench pck); unset ones take the backbone's defaults
StrideOption = Annotated[Optional[int], typer.Option(help="ViT patch stride; must divide the patch size (e.g. 14, 7, 2).")]
LayerOption = Annotated[Optional[str], typer.Option(help="ViT block index, or UNet module path (e.g. up_blocks.1).")]
FacetOption = Annotated[Optional[str], typer.Option("--facet", help="ViT facet: key, query, value or token.")]
LogBinOption = Annotated[Optional[bool], typer.Option("--log-bin/--no-log-bin", help="Log-binned descriptors.")]
ImageSizeOption = Annotated[Optional[int], typer.Option(help="Model input side.")]
FeaturesOption = Annotated[str, typer.Option(help="dino (a ViT's facets), sd (Stable Diffusion decoder features) or sd+dino.")]
DinoOption = Annotated[Optional[str], typer.Option(help="The ViT fused with SD for --features sd+dino (default: the embedded model).")]
DinoSizeOption = Annotated[Optional[int], typer.Option(help="Input side of the ViT in --features sd+dino (default 840).")]


@dataclass(frozen=True)
class EmbeddingOptions:
    """Which model embeds the images and how (bench groups, sref, ip; score)."""

    model: ModelOption = None
    image_size: ImageSizeOption = None
    timestep: TimestepOption = None
    ip_adapter: IpAdapterOption = None
    cache: CacheOption = None
    device: DeviceOption = "auto"
    runtime: RuntimeOption = "auto"

    def kwargs(self) -> dict:
        """The library's keywords (bench.suites.evaluate_*, scoring.score)."""
        return asdict(self)


@dataclass(frozen=True)
class MatcherOptions:
    """The dense matcher's settings (match, bench pck); unset ones take the backbone's defaults."""

    model: ModelOption = None
    dino: DinoOption = None
    stride: StrideOption = None
    layer: LayerOption = None
    facet: FacetOption = None
    log_bin: LogBinOption = None
    image_size: ImageSizeOption = None
    dino_size: DinoSizeOption = None
    device: DeviceOption = "auto"

    def kwargs(self) -> dict:
        """The library's keywords (api.make_matchers, api.match_images)."""
        from ..embedder import parse_layer

        return {**asdict(self), "layer": parse_layer(self.layer)}


def with_option_blocks(command):
    """`command` as Typer sees it: a parameter annotated with an option block (a dataclass of options,
    e.g. EmbeddingOptions) stands for the block's options, declared once there; the command gets the block."""
    signature = inspect.signature(command, eval_str=True)
    blocks = {name: p.annotation for name, p in signature.parameters.items() if is_dataclass(p.annotation)}
    params = []
    for name, p in signature.parameters.items():
        if name not in blocks:
            params.append(p)
            continue
        hints = get_type_hints(blocks[name], include_extras=True)
        params += [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default,
                                     annotation=hints[f.name]) for f in fields(blocks[name])]

    @functools.wraps(command)
    def run(**options):
        for name, block in blocks.items():
            options[name] = block(**{f.name: options.pop(f.name) for f in fields(block)})
        return command(**options)

    run.__signature__ = signature.replace(parameters=params)
    return run


def esc(value) -> str:
    """A user-controlled value made safe to embed in rich markup."""
    return escape(str(value))


def cell(value) -> Text:
    """A table cell shown exactly as given (tables parse plain strings as markup)."""
    return Text(str(value))


def warn_failed(failed) -> None:
    """One `failed: PATH: reason` line per unreadable file."""
    for path, reason in failed:
        err.print(f"[yellow]failed[/]: {esc(path)}: {esc(reason)}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """A plain status line on stderr (`message` is user-controlled text, printed verbatim)."""
    err.print(Text(message), highlight=False, soft_wrap=True)


def quiet_libraries() -> None:
    """No progress bars or info logs from transformers / the hub: both read these when they load, so
    setting them here does not import transformers (a cold query may never need it)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:  # already loaded (a Python caller): switch them off directly
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def progress_callbacks(progress, label: str):
    """(on_total, on_advance) driving one task of a rich Progress."""
    task = progress.add_task(label, total=None)
    return (lambda n: progress.update(task, total=n)), (lambda n: progress.advance(task, n))


def parse_floats(values: list[str], option: str) -> tuple[float, ...]:
    from ..errors import SimsearchError

    try:
        return tuple(float(v) for text in values for v in text.split(",") if v.strip())
    except ValueError:
        raise SimsearchError(f"{option} {' '.join(values)!r}: expected numbers such as 0.1,0.05") from None


def parse_metrics(metric: str) -> tuple[str, ...]:
    from ..bench.features import METRICS

    return METRICS if metric == "all" else tuple(m.strip() for m in metric.split(","))
