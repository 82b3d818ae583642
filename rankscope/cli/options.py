"""Option groups shared by the commands that read and analyse checkpoints, and the parsing of comma lists."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

import click

from ..core.errors import UsageProblem
from .app import note, warn


class CommaList(click.ParamType):
    """A comma-separated vector: ``--weights 0.5,0.3,0.2``, ``--compose a,b``."""

    name = "list"

    def __init__(self, item: type = str) -> None:
        self.item = item

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        parts = [p.strip() for p in str(value).split(",")]
        if not all(parts):
            self.fail(f"{value!r} has an empty item", param, ctx)
        try:
            return tuple(self.item(p) for p in parts)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.item.__name__}s", param, ctx)


class ByteSize(click.ParamType):
    """A memory size: bytes, or with a K/M/G/T suffix (powers of 1024): ``--max-memory 8G``."""

    name = "size"
    _UNITS: ClassVar[dict[str, int]] = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B").removesuffix("I")
        number, unit = (text[:-1], text[-1]) if text[-1:] in self._UNITS else (text, "")
        try:
            size = int(float(number) * self._UNITS[unit])
        except ValueError:
            self.fail(f"{value!r} is not a size such as 512M or 8G", param, ctx)
        if size <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return size


def _stack(*decorators: Callable) -> Callable:
    def apply(function: Callable) -> Callable:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def choice_option(flag: str, choices: Sequence[str], help: str, *names: str) -> Callable:
    """``--flag`` taking one of ``choices``, the first by default (shown in --help); ``names``: its parameter
    name where it is not the flag's."""
    return click.option(flag, *names, type=click.Choice(list(choices)), default=choices[0], show_default=True, help=help)  # fmt: skip


checkpoint_options = _stack(
    click.option("--adapter", metavar="NAME", help="Pick one adapter of a multi-adapter directory by name."),
    click.option("--alpha", type=float, help="LoRA α where the checkpoint does not say (overrides the config's)."),
    click.option("--format", "format_name", metavar="NAME", help="Force a reader instead of detecting one ('rankscope formats')."),
    click.option("--base", metavar="PATH", help="Base model for updates that need it (DoRA, IA3, PiSSA/OLoRA inits, VeRA widths): a Hugging Face model directory, a diffusers component or pipeline folder, or one safetensors file. Every layer is then also measured against its base weight ('base' in --json: relative update, amplification, intruders)."),
    click.option("--directional-only", is_flag=True, help="DoRA without its base: analyse s·B·A alone (labelled so)."),
    click.option("--trust-pickle", is_flag=True, help="Unpickle a .bin/.pt/.ckpt in full when weights_only refuses it. Runs code from the file: only for your own files."),
    click.option("--compose", type=CommaList(), metavar="A,B,…", help="Sum these adapters of a multi-adapter directory (with --weights)."),
    click.option("--weights", type=CommaList(float), metavar="W1,W2,…", help="Weights of the --compose adapters (default: 1 each)."),
    click.option("--normalize", type=click.Choice(["none", "softmax"]), help="With --compose: the weights are used as given (none, the default), or are logits (softmax)."),
    click.option("--mode", type=click.Choice(["sum", "sequential"]), help="With --compose: all together (sum, the default), or boosting rounds in order (sequential: adds the growth curve)."),
)  # fmt: skip

analysis_options = _stack(
    click.option("--threshold", "thresholds", type=float, multiple=True, metavar="τ", help="Count σ > τ (absolute); repeatable. Default 0.005."),
    click.option("--energy", "energies", type=float, multiple=True, metavar="P", help="Energy rank at fraction P; repeatable. Default 0.9 0.95 0.99."),
    click.option("--rel-threshold", "rel_thresholds", type=float, multiple=True, metavar="ρ", help="Count σ > ρ·σ₁; repeatable. Default 0.001."),
    click.option("--layers", metavar="REGEX", help="Analyse only layers whose name matches REGEX (re.search)."),
    click.option("--unscaled", is_flag=True, help="Analyse B·A without α/r (labelled so in every output)."),
    click.option("--dense", is_flag=True, help="Materialise ΔW and take a dense SVD instead of the exact factored path."),
    choice_option("--dense-dtype", ["float64", "float32"], "Dense SVD precision (float32 is faster, labelled approximate)."),
    click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda", help="Where the dense path runs."),
    click.option("--top-k", "top_k", type=click.IntRange(min=1), metavar="K", help="Dense layers wider than K+10: only the top K σ, by a seeded randomised SVD with power iterations (exact: false; norm-based metrics kept, a certificate that no larger σ was missed)."),
    click.option("--max-memory", type=ByteSize(), metavar="SIZE", help="Refuse (per layer, with the size it would need) a dense SVD above SIZE, e.g. 8G. Default: half the RAM."),
    click.option("--collapse-threshold", type=click.FloatRange(0, 1), default=0.9, show_default=True, help="A composition is collapsed when one component carries more than this share of the energy."),
    click.option("--base-measures/--no-base-measures", default=True, help="With --base: measure every layer against its base weight (relative update, amplification, intruders; the default). --no-base-measures uses the base only to form the updates that need it (DoRA, IA3, OFT, full fine-tunes): the spectrum alone."),
    click.option("--intruders/--no-intruders", default=None, help="With --base: intruder dimensions (two dense SVDs with vectors per layer) for every layer, or none. Default: where min(m, n) ≤ 2048 on the CPU, every layer on CUDA."),
    click.option("--intruder-k", type=click.IntRange(min=1), default=10, show_default=True, metavar="K", help="With --base: look for intruders among the top K singular vectors of W₀ + ΔW."),
    click.option("--intruder-epsilon", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True, metavar="ε", help="With --base: an intruder's largest |cosine| with W₀'s left singular vectors is below ε."),
    click.option("--amplification-k", type=click.IntRange(min=1), default=16, show_default=True, metavar="K", help="With --base: the amplification factor's k for updates without a rank bound (full fine-tunes, DoRA)."),
)  # fmt: skip


ANALYSIS_KEYS = frozenset(
    {"thresholds", "energies", "rel_thresholds", "layers", "unscaled", "dense", "dense_dtype", "device",
     "collapse_threshold", "max_memory", "top_k",
     "base_measures", "intruders", "intruder_k", "intruder_epsilon", "amplification_k"}
)  # fmt: skip
COMPOSE_ONLY = ("weights", "normalize", "mode")  # options that mean something only with --compose


# trajectory.document.DEFAULT_DRIFT_THRESHOLD, not imported: it reads torch, and the CLI must stay cheap to import
DRIFT_THRESHOLD = 0.05


def _scoped(scope: str, text: str) -> str:
    """``text`` as the help of an option that applies only where ``scope`` says (``drift: compare …``)."""
    return f"{scope}: {text[0].lower()}{text[1:]}" if scope else text


def drift_k_option(scope: str = "") -> Callable:
    """``--drift-k K``: the k of the subspace overlaps between steps (``rankscope trajectory``'s, ``plot drift``'s,
    a run report's); ``scope`` prefixes its help where it applies to only some of a command's inputs."""
    return click.option("--drift-k", type=click.IntRange(min=1), metavar="K", help=_scoped(scope, "Compare the top K singular vectors (default: the smaller numerical rank of the two steps)."))  # fmt: skip


def drift_threshold_option(scope: str = "") -> Callable:
    """``--drift-threshold D``: the mean drift below which a run has settled (headlines, the run page)."""
    return click.option("--drift-threshold", type=click.FloatRange(0, 1), default=DRIFT_THRESHOLD, show_default=True, metavar="D", help=_scoped(scope, "The run has settled from the first step whose mean subspace drift against the previous checkpoint stays below D."))  # fmt: skip


def load_and_settings(path: str, options: dict):
    """Split a command's keyword options into the checkpoint they name and the analysis settings they ask for."""
    settings = analysis_settings(**{k: v for k, v in options.items() if k in ANALYSIS_KEYS})
    checkpoint = load_checkpoint(path, **{k: v for k, v in options.items() if k not in ANALYSIS_KEYS})
    return checkpoint, settings


def load_checkpoint(path: str, *, format_name, normalize, mode, **options):
    """The checkpoint the options describe (warnings about pickles first); the other options are ``load``'s."""
    from ..formats import load

    if options["trust_pickle"]:
        warn("--trust-pickle: pickled files are loaded in full, which runs any code they hold")
    if not options["compose"]:
        given = [name for name, value in zip(COMPOSE_ONLY, (options["weights"], normalize, mode), strict=True) if value]
        if given:
            raise UsageProblem(f"--{given[0]} applies only with --compose A,B,…")
    return load(path, format=format_name, normalize=normalize or "none", mode=mode or "sum", **options)


def analysis_settings(*, max_memory, **options):
    """The :class:`AnalysisOptions` the options ask for: a metric parameter not given takes its defaults."""
    from ..analysis.options import AnalysisOptions
    from ..measures import metrics as M

    defaults = {"thresholds": M.DEFAULT_THRESHOLDS, "energies": M.DEFAULT_ENERGIES,
                "rel_thresholds": M.DEFAULT_REL_THRESHOLDS}  # fmt: skip
    for name, default in defaults.items():
        options[name] = tuple(options[name]) or default
    return AnalysisOptions(**options, **({"max_memory": max_memory} if max_memory is not None else {}))


def run_analysis(checkpoint, options, *, quiet: bool, progress=None, where: str | None = None, announce: bool = True):
    """Analyse with a progress bar (``progress``: a :class:`~rankscope.report.progress.Progress` over several
    phases, else a bar of its own); fail (exit 1) when no layer can be analysed; then say what was read
    (``announce``), each message prefixed by ``where`` (default: the checkpoint's path)."""
    from ..analysis.analyze import analyze
    from ..core.errors import RankscopeError
    from ..report.progress import ProgressBar
    from .interrupt import check

    bar = progress if progress is not None else ProgressBar("analysing", enabled=not quiet, check=check)
    try:
        analysis = analyze(checkpoint, options, progress=bar)
    finally:
        if progress is None:
            bar.close()
    invalid = analysis.invalid
    if len(invalid) == len(analysis.layers):
        place = checkpoint.weights_file or checkpoint.path
        raise RankscopeError(f"{place}: no layer can be analysed: {invalid[0].error}")
    if announce:
        announce_analysis(analysis, quiet=quiet, where=where)
    return analysis


def announce_analysis(analysis, *, quiet: bool, where: str | None = None) -> None:
    """The checkpoint's and the analysis' warnings, then (unless quiet) its notes, each prefixed by ``where``."""
    checkpoint = analysis.checkpoint
    where = where or str(checkpoint.path)
    for message in checkpoint.warnings + analysis.warnings:
        warn(f"{where}: {message}")
    if not quiet:
        for message in checkpoint.notes + analysis.notes:
            note(f"note: {where}: {message}" if where != str(checkpoint.path) else f"note: {message}")


def analyse_paths(paths, labels, options: dict, *, quiet: bool):
    """Load and analyse each of ``paths`` under one progress line (loading, analysing: each checkpoint in turn);
    then the labels (``labels``, or the shortest distinguishing path suffixes) and each checkpoint's messages
    labelled by them. Returns (analyses, labels, progress) — the progress line for the phases that follow."""
    from ..core.naming import checkpoint_labels
    from ..report.progress import Progress
    from .interrupt import check

    progress = Progress(enabled=not quiet, check=check)
    paths = natural_order(paths) if labels is None else list(paths)
    analyses = []
    try:
        for index, path in enumerate(paths, 1):
            shown = path if len(path) <= 40 else "…" + path[-39:]
            progress.phase(f"loading {index}/{len(paths)} {shown}")
            checkpoint, settings = load_and_settings(path, options)
            progress.phase(f"analysing {index}/{len(paths)} {shown}")
            analyses.append(run_analysis(checkpoint, settings, quiet=quiet, progress=progress, announce=False))
    finally:
        progress.close()  # before any message: an error or warning starts on a clean line
    labels = list(labels) if labels is not None else checkpoint_labels([a.checkpoint.path for a in analyses])
    for label, analysis in zip(labels, analyses, strict=True):
        announce_analysis(analysis, quiet=quiet, where=label if len(analyses) > 1 else None)
    return analyses, labels, progress


def natural_order(paths) -> list[str]:
    """Paths in string order — as a shell glob lists them: ``checkpoint-1000 checkpoint-1500 checkpoint-500`` — in
    natural order (``checkpoint-500`` first); paths given in any other order stay as given (the first is the
    baseline)."""
    from ..core.naming import natural_key

    paths = list(paths)
    return sorted(paths, key=natural_key) if paths == sorted(paths) else paths


def report_problems(analysis, *, quiet: bool, where: str | None = None) -> None:
    """Invalid layers (always), unused tensors and sibling adapters (unless quiet), on stderr; ``where``
    prefixes each (default: the checkpoint's file)."""
    checkpoint = analysis.checkpoint
    where = where or str(checkpoint.weights_file or checkpoint.path)
    for record in analysis.invalid:
        warn(f"{where}: layer {record.name} is invalid: {record.error}")
    if quiet:
        return
    warned = {key for item in checkpoint.not_analysed for key in item.keys}  # the load warned about these already
    unused = [s for s in checkpoint.skipped if s.key not in warned]
    if unused:
        reasons = "; ".join(sorted({s.reason for s in unused}))
        note(f"{len(unused)} tensors not used ({reasons}); listed under 'skipped' in --json")
    if checkpoint.other_adapters:
        names = ", ".join(checkpoint.other_adapters)
        note(f"this checkpoint also holds adapters: {names} (pick one with --adapter NAME)")


def output_option(flag: str, help: str) -> Callable:
    """An output destination, ``--json FILE`` → parameter ``json_out`` (``-``: stdout)."""
    return click.option(flag, f"{flag.lstrip('-')}_out", metavar="FILE", help=help)
