"""rankscope's performance benchmark: the alternatives side by side, on the same files, in one run.

    python benchmarks/run.py            # Llama-3-8B and -70B shapes, 5 repeats (≈ 10–25 min on 2 busy cores)
    python benchmarks/run.py --quick    # 8B shapes only, 3 repeats, small dense samples (≈ 3–6 min): a smoke test

It writes PEFT-format adapters with the real shapes of Llama-3-8B (32 layers × q,k,v,o,gate,up,down; hidden 4096,
kv 1024, intermediate 14336) and Llama-3-70B (80 layers; 8192 / 1024 / 28672) — r = 16, bf16, random factors —
plus a BoRA (r = 8, b = 16), a composition (k = 3, r = 8) and a LoRA whose B factors are ill-conditioned
(κ = 1e4: they take the Householder fallback) of the 8B shape, once, into a temporary folder. Then, each as the
median of several runs, interleaved so that the machine's drift hits all of them alike:

1. the I/O floor (safetensors reads every tensor, nothing else) and the floor (read + upcast to float32 + one
   pass over every element, the faster of 1 thread and torch's default);
2. rankscope end to end: ``rankscope spectrum FILE --json out.json`` as a process, and the library call
   ``rankscope.analyze(rankscope.load(FILE))``; and ``python -c "import torch"`` for scale;
3. the dense baseline: ΔW = s·B·A materialised in float64 and ``torch.linalg.svdvals``, on one layer of each
   shape, extrapolated to the model (shapes too big for the run's budget are extrapolated from the measured ones
   by the O(m·n·min(m, n)) cost law: the report says which);
4. WeightWatcher ``analyze(peft=True)`` on the same sampled layers (one file per layer: its ``layers=`` filter
   does not work with safetensors), extrapolated the same way;
5. the peak RSS of the rankscope process against that of a process that only imports torch.

It checks rankscope's singular values against the dense ones per sampled layer, prints a table and writes
``reports/benchmarks.md`` with the machine and the ratios. Absolute times drift on a shared machine; the
ratios, taken within one run, are what the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from adapters import (  # noqa: E402
    LLAMA3_8B,
    LLAMA3_70B,
    ModelShape,
    file_bytes,
    write_bora,
    write_composition,
    write_lora,
    write_subset,
)

MB = 1e6
RSS_HEADROOM = 200 * MB
TARGETS = {
    "library_over_floor": 5.0,  # library analysis ≤ 5 × the floor (8B and 70B)
    "cli_over_torch_import": 1.0,  # CLI ≤ import torch + 1 s (8B)
    "dense_over_rankscope": 1e4,
    "weightwatcher_over_rankscope": 1e3,
    "sigma_relative": 1e-6,
}


# -- running things -------------------------------------------------------------------------------------------
def worker(task: str, env: dict | None = None, timeout: float | None = None, **arguments) -> dict:
    """Run one task of worker.py in a fresh process and return its JSON result."""
    command = [sys.executable, str(HERE / "worker.py"), task, json.dumps(arguments)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    marker = done.stdout.rfind("@@RESULT@@")
    if done.returncode != 0 or marker < 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"worker {task} failed ({done.returncode}): " + " | ".join(tail))
    return json.loads(done.stdout[marker + len("@@RESULT@@") :])


def timed_process(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall time (s) and peak RSS (bytes) of one process, measured by the small launcher ``peak.py``."""
    launcher = [sys.executable, str(HERE / "peak.py"), "--", *command]
    done = subprocess.run(launcher, capture_output=True, text=True, env=env, check=False)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"peak.py failed: {done.stderr.strip()[-400:]}") from exc
    if result["exit"] != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result['exit']}: {result['stderr'].strip()}")
    return result["seconds"], float(result["peak_rss"])


def rankscope_command() -> list[str]:
    script = Path(sys.executable).parent / "rankscope"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rankscope"]


def env_with(pythonpath: Path | None) -> dict:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- the machine ----------------------------------------------------------------------------------------------
def machine() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": gpu,
        "load_average_start": os.getloadavg(),
    }


# -- the adapters ---------------------------------------------------------------------------------------------
@dataclass
class Adapter:
    key: str
    label: str
    path: Path
    shape: ModelShape | None = None  # set for the LoRA adapters the dense baselines extrapolate to
    results: dict = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return file_bytes(self.path)


def generate(root: Path, quick: bool) -> tuple[list[Adapter], float]:
    start = time.perf_counter()
    adapters = [Adapter("8b", "Llama-3-8B LoRA r=16", write_lora(root / "llama3-8b-r16", LLAMA3_8B), LLAMA3_8B)]
    if not quick:
        adapters.append(
            Adapter("70b", "Llama-3-70B LoRA r=16", write_lora(root / "llama3-70b-r16", LLAMA3_70B), LLAMA3_70B)
        )
    adapters += [
        Adapter("8b-bora", "8B BoRA r=8 b=16", write_bora(root / "llama3-8b-bora-r8-b16", LLAMA3_8B)),
        Adapter("8b-comp", "8B composition k=3 r=8", write_composition(root / "llama3-8b-comp-k3-r8", LLAMA3_8B)),
        Adapter(
            "8b-illcond",
            "8B LoRA r=16, κ(B)=1e4",
            write_lora(root / "llama3-8b-r16-illcond", LLAMA3_8B, condition_b=1e4, seed=5),
        ),
    ]
    return adapters, time.perf_counter() - start


# -- dense baselines: measured where affordable, else extrapolated by the cost law ---------------------------------
def cost(m: int, n: int) -> float:
    """The O(m·n·min(m, n)) work of a dense SVD."""
    return float(m) * n * min(m, n)


@dataclass
class Sampled:
    """One layer of each distinct shape of a model, and what the dense tools took on it."""

    module: str
    m: int
    n: int
    count: int  # layers of this shape in the model
    dense: float | None = None  # measured seconds
    weightwatcher: float | None = None
    dense_path: float | None = None
    sigma_error: float | None = None
    ww_ratio: float | None = None  # WeightWatcher's σ₁ · α/r over the dense σ₁

    def estimate(self, tool: str, law: Law | None) -> tuple[float | None, bool]:
        """(seconds, measured?) for ``tool`` on this shape; from the cost ``law`` when not measured."""
        value = getattr(self, tool)
        if value is not None:
            return value, True
        return (law(self.m, self.n), False) if law is not None else (None, False)


Law = Callable[[int, int], float]


def sampled_layers(shape: ModelShape) -> list[Sampled]:
    counts: dict[tuple[int, int], int] = {}
    for _, m, n in shape.modules():
        counts[(m, n)] = counts.get((m, n), 0) + 1
    return [Sampled(path, m, n, counts[(m, n)]) for path, m, n in shape.distinct_shapes()]


def cubic_law(samples: list[Sampled], tool: str) -> Law | None:
    """t = c·m·n·min(m, n) (a dense SVD), c from the largest shape measured with ``tool`` (the most reliable)."""
    measured = [s for s in samples if getattr(s, tool) is not None]
    if not measured:
        return None
    largest = max(measured, key=lambda s: cost(s.m, s.n))
    rate = getattr(largest, tool) / cost(largest.m, largest.n)
    return lambda m, n: rate * cost(m, n)


def linear_law(samples: list[Sampled], tool: str) -> Law | None:
    """t = a + b·m·n, least squares over the measured shapes: WeightWatcher forms B·A densely and takes a truncated
    SVD of rank r (both ∝ m·n), plus fixed costs per call (reading, the power-law fit)."""
    points = [(float(s.m * s.n), getattr(s, tool)) for s in samples if getattr(s, tool) is not None]
    if not points:
        return None
    xs = [x for x, _ in points]
    if len(set(xs)) < 2:
        x0, t0 = points[0]
        return lambda m, n: t0 * m * n / x0
    mean_x, mean_t = statistics.fmean(xs), statistics.fmean(t for _, t in points)
    slope = sum((x - mean_x) * (t - mean_t) for x, t in points) / sum((x - mean_x) ** 2 for x in xs)
    slope = max(slope, 0.0)
    intercept = max(mean_t - slope * mean_x, 0.0)
    return lambda m, n: intercept + slope * m * n


def model_estimate(samples: list[Sampled], tool: str, law: Law | None) -> tuple[float | None, int]:
    """Seconds for every layer of the model with ``tool`` (unmeasured shapes from ``law``) and how many of its
    shapes were measured."""
    total, measured = 0.0, 0
    for sample in samples:
        seconds, was_measured = sample.estimate(tool, law)
        if seconds is None:
            return None, 0
        total += seconds * sample.count
        measured += was_measured
    return total, measured


def relative_error(ours: list[float], dense: list[float]) -> float:
    """max |σ − σ_dense| / σ_dense over σ_dense ≥ 1e-6·σ₁ (the exactness rankscope promises)."""
    top = dense[0]
    pairs = [(a, b) for a, b in zip(ours, dense, strict=False) if b >= 1e-6 * top]
    return max(abs(a - b) / b for a, b in pairs) if pairs else 0.0


def run_dense_baselines(
    base: Adapter, root: Path, max_cost: float, dense_path_cost: float, ww_max_elements: float, use_ww: bool, log
) -> tuple[list[Sampled], dict]:
    """Dense SVD, rankscope's --dense path and WeightWatcher on one layer of each shape of ``base``."""
    assert base.shape is not None
    samples = sampled_layers(base.shape)
    subset = write_subset(base.path, root / f"{base.key}-sampled", [s.module for s in samples])
    affordable = [s for s in samples if cost(s.m, s.n) <= max_cost]
    info: dict = {"subset": subset}
    ours = worker("rankscope_spectra", path=str(subset))
    info["rankscope_sampled"] = worker("inproc", path=str(subset), repeats=5)
    for sample in affordable:
        log(f"  dense SVD {base.shape.name} {sample.m}×{sample.n} …")
        result = worker("dense", path=str(subset), modules=[sample.module])[sample.module]
        sample.dense = result["seconds"]
        sample.sigma_error = relative_error(ours[sample.module], result["sigma"])
        result["sigma_max"] = result["sigma"][0]
        info.setdefault("sigma_max", {})[sample.module] = (ours[sample.module][0], result["sigma"][0])
    for sample in [s for s in affordable if cost(s.m, s.n) <= dense_path_cost]:
        log(f"  rankscope --dense {base.shape.name} {sample.m}×{sample.n} …")
        result = worker("dense_path", path=str(subset), modules=[sample.module], device="cpu")
        sample.dense_path = result[sample.module]["seconds"]
    if use_ww:
        scale = json.loads((subset / "adapter_config.json").read_text())
        scale = scale["lora_alpha"] / scale["r"]
        for sample in [s for s in samples if s.m * s.n <= ww_max_elements]:
            log(f"  WeightWatcher {base.shape.name} {sample.m}×{sample.n} …")
            single = write_subset(base.path, root / f"{base.key}-ww-{sample.m}x{sample.n}", [sample.module])
            result = worker("weightwatcher", path=str(single))
            if "missing" in result:
                info["weightwatcher_missing"] = result["missing"]
                break
            sample.weightwatcher = result["seconds"]
            info["weightwatcher_version"] = result["version"]
            sv_max = next((v for k, v in result["sv_max"].items() if sample.module in k), None)
            dense_top = info.get("sigma_max", {}).get(sample.module, (None, None))[1]
            if sv_max is not None and dense_top:
                sample.ww_ratio = sv_max * scale / dense_top
    return samples, info


# -- the run ----------------------------------------------------------------------------------------------------
def measure(adapters: list[Adapter], repeats: int, before: Path | None, log) -> dict:
    """CLI and torch-import processes interleaved round by round; the in-process measurements in one worker per
    adapter (itself interleaving I/O floor, floor and library call round by round)."""
    cli = rankscope_command()
    rows: dict[str, list] = {"torch_import": []}
    out_json = Path(tempfile.gettempdir()) / f"rankscope-bench-{os.getpid()}.json"
    versions = [("now", None)] + ([("before", before)] if before else [])
    for round_index in range(repeats):
        log(f"  process round {round_index + 1}/{repeats} …")
        rows["torch_import"].append(timed_process([sys.executable, "-c", "import torch"]))
        for adapter in adapters:
            for version, pythonpath in versions:
                if version == "before" and adapter.key not in ("8b", "70b"):
                    continue
                command = ([sys.executable, "-m", "rankscope"] if pythonpath else cli) + [
                    "spectrum", str(adapter.path), "--json", str(out_json)
                ]  # fmt: skip
                rows.setdefault(f"cli:{adapter.key}:{version}", []).append(timed_process(command, env_with(pythonpath)))
    out_json.unlink(missing_ok=True)
    for adapter in adapters:
        log(f"  in-process measurements: {adapter.label} …")
        adapter.results["now"] = worker("inproc", path=str(adapter.path), repeats=repeats)
        if before and adapter.key in ("8b", "70b"):
            log(f"  in-process measurements, before: {adapter.label} …")
            adapter.results["before"] = worker("inproc", env=env_with(before), path=str(adapter.path), repeats=repeats)
            adapter.results["before_1"] = worker(
                "inproc", env=env_with(before), path=str(adapter.path), repeats=repeats, threads=1
            )
    for adapter in adapters:
        if adapter.key in ("8b", "8b-illcond"):
            adapter.results["methods"] = worker("methods", path=str(adapter.path))
    return rows


def summarise(adapters: list[Adapter], rows: dict) -> dict:
    torch_time = median([t for t, _ in rows["torch_import"]])
    torch_rss = median([r for _, r in rows["torch_import"]])
    summary = {"torch_import": torch_time, "torch_rss": torch_rss, "adapters": {}}
    for adapter in adapters:
        entry = {"label": adapter.label, "bytes": adapter.bytes}
        for version in ("now", "before", "before_1"):
            if version not in adapter.results:
                continue
            times = adapter.results[version]["times"]
            values = {name: median(series) for name, series in times.items()}
            values["floor"] = min(values["floor_1"], values["floor_default"])
            cli_rows = rows.get(f"cli:{adapter.key}:{version}", []) or [(float("nan"), float("nan"))]
            values["cli"] = median([t for t, _ in cli_rows])
            values["cli_rss"] = median([r for _, r in cli_rows])
            entry[version] = values
        entry["layers"] = adapter.results["now"]["layers"]
        entry["methods"] = adapter.results.get("methods")
        summary["adapters"][adapter.key] = entry
    return summary


def fmt_seconds(value: float | None) -> str:
    if value is None or value != value:
        return "—"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 60:
        return f"{value / 60:.1f} min"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:.1f} ms"


def fmt_ratio(value: float | None) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:,.0f}×" if value >= 100 else f"{value:.1f}×"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**not met**")


def build_report(info: dict, summary: dict, dense: dict, args, generation: float, elapsed: float) -> str:
    m = info
    lines = [
        "# rankscope benchmarks",
        "",
        f"Generated by `python benchmarks/run.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} in {fmt_seconds(elapsed)} (adapters written in "
        f"{fmt_seconds(generation)}). Medians of {args.repeats} runs, interleaved; the dense tools once per shape. "
        "This machine is shared: absolute times drift between runs, the ratios taken within one run are what the "
        "targets are stated in.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}; {m['cores']} cores ({m['usable_cores']} usable); torch {m['torch']} "
        f"({m['torch_threads']} threads by default); Python {m['python']}; {m['platform']}",
        f"- device: CPU{'' if not m['gpu'] else ' (GPU present: ' + m['gpu'] + ')'}; no GPU was lent to this "
        "benchmark's session (the device tool's status said can_start_another = false), so the CUDA dense path "
        "(`--device cuda`) is not measured here",
        f"- load average at start {tuple(round(x, 2) for x in m['load_average_start'])}, at end "
        f"{tuple(round(x, 2) for x in m['load_average_end'])} (other agents share these cores)",
        "",
        "## rankscope against the floors",
        "",
        "| adapter | file | layers | I/O floor | floor | library (load + analyse) | lib ÷ I/O | lib ÷ floor "
        "| CLI `spectrum --json` | CLI − `import torch` | peak RSS − torch's |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    torch_time, torch_rss = summary["torch_import"], summary["torch_rss"]
    for entry in summary["adapters"].values():
        now = entry["now"]
        lines.append(
            f"| {entry['label']} | {entry['bytes'] / MB:.0f} MB | {entry['layers']} | {fmt_seconds(now['io'])} | "
            f"{fmt_seconds(now['floor'])} | {fmt_seconds(now['library'])} ({fmt_seconds(now['load'])} + "
            f"{fmt_seconds(now['analyze'])}) | {fmt_ratio(now['library'] / now['io'])} | "
            f"{fmt_ratio(now['library'] / now['floor'])} | {fmt_seconds(now['cli'])} | "
            f"{fmt_seconds(now['cli'] - torch_time)} | {(now['cli_rss'] - torch_rss) / MB:.0f} MB |"
        )
    lines += [
        "",
        f'`python -c "import torch"`: {fmt_seconds(torch_time)}, peak RSS {torch_rss / MB:.0f} MB (same run). '
        "I/O floor: safetensors reads every tensor and nothing else (zero-copy on safetensors ≥ 0.6, so this is the "
        "cost of opening and mapping). Floor: read + upcast to float32 + one pass over every element, the faster of "
        "1 thread and torch's default.",
        "",
    ]
    before_rows = [(k, e) for k, e in summary["adapters"].items() if "before" in e]
    if before_rows:
        lines += [
            "### Before and after (same run)",
            "",
            f"`before` is the rankscope package at `{args.before_label or args.before}` (batched Householder QR of "
            "stacked float64 factors, per-layer metrics). With torch's default threads it is at the mercy of the "
            "machine's other load (every small op a fork-join that waits for a descheduled thread), so it is also "
            "timed with torch on 1 thread: the algorithmic part of the speed-up.",
            "",
            "| adapter | library before (default threads) | library before (1 thread) | library now | speed-up "
            "(vs 1 thread) | CLI before | CLI now | lib ÷ floor: before (1 thread) → now |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for _, entry in before_rows:
            b, n = entry["before"], entry["now"]
            b1 = entry.get("before_1", b)
            lines.append(
                f"| {entry['label']} | {fmt_seconds(b['library'])} | {fmt_seconds(b1['library'])} | "
                f"{fmt_seconds(n['library'])} | {fmt_ratio(b['library'] / n['library'])} "
                f"({fmt_ratio(b1['library'] / n['library'])}) | {fmt_seconds(b['cli'])} | {fmt_seconds(n['cli'])} | "
                f"{b1['library'] / n['floor']:.1f}× → {n['library'] / n['floor']:.1f}× |"
            )
        lines.append("")
    methods = {k: e["methods"] for k, e in summary["adapters"].items() if e.get("methods")}
    if methods:
        lines += [
            "QR path per factor (CholeskyQR where ε·κ² ≤ 1e-7 is proved, else Householder): "
            + "; ".join(f"{summary['adapters'][k]['label']}: {v}" for k, v in methods.items()),
            "",
        ]
    checks, dense_lines = dense_section(summary, dense)
    lines += dense_lines
    lines += targets_section(summary, dense, checks)
    lines += notes_section(summary, dense)
    return "\n".join(lines) + "\n"


def notes_section(summary: dict, dense: dict) -> list[str]:
    """How the numbers come about, and what is slow still."""
    adapters = summary["adapters"]
    lines = ["## Notes", ""]
    if "8b" in adapters and "8b-illcond" in adapters:
        base, ill = adapters["8b"]["now"], adapters["8b-illcond"]["now"]
        lines.append(
            "- The factored path reads each factor once into a reused float64 buffer and takes its Gram matrix "
            "(numpy's BLAS `syrk`); CholeskyQR's R is kept where the rounding bound ε·κ² ≤ 1e-7 holds (κ of the "
            "column-equilibrated factor ≲ 63 for 14336×16, ≲ 117 for 4096×16), else the factor takes Householder QR. "
            "Random factors, and most trained A factors, are near κ = 1; the `κ(B)=1e4` adapter sends all 224 B "
            f"factors to Householder: {fmt_seconds(ill['library'])} against {fmt_seconds(base['library'])} "
            f"({ill['library'] / base['library']:.1f}×)."
        )
    lines.append(
        "- rankscope runs torch (and numpy's OpenBLAS) single-threaded and spreads the factors over Python threads: "
        "on these shared cores a fork-join per small op waits for a descheduled thread (the `before` column with "
        "default threads shows it; reading an 8B adapter was measured at 3 s on 2 threads against 0.02 s on one)."
    )
    if "8b-bora" in adapters:
        bora = adapters["8b-bora"]["now"]
        lines.append(
            f"- BoRA ({fmt_seconds(bora['library'])}, peak RSS {(bora['cli_rss'] - summary['torch_rss']) / MB:.0f} MB "
            "over torch's): the stored blocks are kept (R = blockdiag(R_i) from per-block Grams, no block-diagonal "
            "matrix is formed); most of the time is the SVD of one (b·r)² = 128² core per layer."
        )
    if "8b-comp" in adapters:
        comp = adapters["8b-comp"]["now"]
        lines.append(
            f"- Composition ({fmt_seconds(comp['library'])}, peak RSS "
            f"{(comp['cli_rss'] - summary['torch_rss']) / MB:.0f} MB over torch's): the components' factors are "
            "concatenated in their stored dtype (`update.weighted_sum`, weights in the K×K core); most of the "
            "time is the components' pairwise alignment (`measures.components`: singular vectors by Householder "
            "QR and exact cosines from the factors, pair by pair)."
        )
    samples = dense.get("8b", {}).get("samples", [])
    tall = next((s for s in samples if (s.m, s.n) == (14336, 4096) and s.dense), None)
    wide = next((s for s in samples if (s.m, s.n) == (4096, 14336) and s.dense), None)
    if tall and wide:
        lines.append(
            f"- The dense SVD of the wide 4096×14336 matrix took {wide.dense / tall.dense:.1f}× as long as the tall "
            "14336×4096 one (same cost law): extrapolations take the first largest shape measured, here the "
            "faster one, so the dense estimates err low."
        )
    lines.append(
        "- Dense times are single runs per shape; WeightWatcher's include its fixed costs per call (reading, the "
        "power-law fit), which is why the sampled-layer ratios are lower than the whole-model ones."
    )
    return [*lines, ""]


def dense_section(summary: dict, dense: dict) -> tuple[dict, list[str]]:
    lines = ["## Dense baselines (same factors, same layers)", ""]
    checks: dict = {}
    # one rate per tool for every extrapolation: from the largest shape measured in this run, of either model
    everything = [s for key in dense for s in dense[key]["samples"]]
    rate_dense, rate_ww = cubic_law(everything, "dense"), linear_law(everything, "weightwatcher")
    for key in ("8b", "70b"):
        if key not in dense:
            continue
        samples, info = dense[key]["samples"], dense[key]["info"]
        entry = summary["adapters"][key]
        library = entry["now"]["library"]
        sampled_library = median(info["rankscope_sampled"]["times"]["library"])
        lines += [
            f"### {entry['label']}",
            "",
            "| layer shape (m×n) | layers | dense float64 `svdvals` | rankscope `--dense` (CPU) | WeightWatcher "
            "`analyze(peft=True)` | rankscope σ vs dense: max rel. error | WW σ₁·α/r ÷ dense σ₁ |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in samples:
            d, d_measured = s.estimate("dense", rate_dense)
            w, w_measured = s.estimate("weightwatcher", rate_ww)
            lines.append(
                f"| {s.m}×{s.n} | {s.count} | {fmt_seconds(d)}{'' if d_measured else ' (extrapolated)'} | "
                f"{fmt_seconds(s.dense_path) if s.dense_path else '—'}"
                f"{f' ({1 / s.dense_path:.2f} layers/s)' if s.dense_path else ''} | "
                f"{fmt_seconds(w)}{'' if w_measured or w is None else ' (extrapolated)'} | "
                f"{f'{s.sigma_error:.1e}' if s.sigma_error is not None else '—'} | "
                f"{f'{s.ww_ratio:.4f}' if s.ww_ratio is not None else '—'} |"
            )
        dense_model, dense_measured = model_estimate(samples, "dense", rate_dense)
        ww_model, ww_measured = model_estimate(samples, "weightwatcher", rate_ww)
        sampled_dense = sum(s.estimate("dense", rate_dense)[0] for s in samples)
        sampled_ww = sum(s.estimate("weightwatcher", rate_ww)[0] for s in samples) if rate_ww else None
        checks[key] = {
            "dense_model": dense_model,
            "ww_model": ww_model,
            "dense_ratio": dense_model / library if dense_model else None,
            "ww_ratio": ww_model / library if ww_model else None,
            "dense_ratio_sampled": sampled_dense / sampled_library,
            "ww_ratio_sampled": sampled_ww / sampled_library if sampled_ww else None,
            "sigma_error": max((s.sigma_error for s in samples if s.sigma_error is not None), default=None),
            "ww_missing": info.get("weightwatcher_missing"),
        }
        c = checks[key]
        lines += [
            "",
            f"Whole model ({sum(s.count for s in samples)} layers): dense {fmt_seconds(dense_model)} "
            f"({coverage(dense_measured, len(samples), DENSE_LAW)}), WeightWatcher {fmt_seconds(ww_model)} "
            f"({coverage(ww_measured, len(samples), 't = a + b·m·n fitted to the measured ones')}), rankscope "
            f"{fmt_seconds(library)}: dense ÷ rankscope "
            f"**{fmt_ratio(c['dense_ratio'])}**, WeightWatcher ÷ rankscope **{fmt_ratio(c['ww_ratio'])}**.",
            f"On the {len(samples)} sampled layers alone (one file holding just them): rankscope's library call "
            f"{fmt_seconds(sampled_library)} (fixed costs included), dense {fmt_seconds(sampled_dense)}: "
            f"{fmt_ratio(c['dense_ratio_sampled'])}; WeightWatcher {fmt_ratio(c['ww_ratio_sampled'])}.",
            "",
        ]
        if info.get("weightwatcher_missing"):
            lines += [f"WeightWatcher: not measured — {info['weightwatcher_missing']}.", ""]
    lines += [
        "WeightWatcher's σ₁ is that of the bare B·A: it ignores the α/r scale, so it is off by a factor α/r (here 2); "
        "multiplied back by α/r it matches the dense σ₁ (column WW σ₁·α/r ÷ dense σ₁). rankscope's singular values "
        "are of the scaled ΔW and match the dense float64 ones (column max rel. error, over σ_i ≥ 1e-6·σ₁).",
        "",
    ]
    return checks, lines


DENSE_LAW = "t ∝ m·n·min(m, n) from the largest shape measured in this run"


def coverage(measured: int, shapes: int, law: str) -> str:
    if measured == shapes:
        return f"all {shapes} shapes measured"
    return f"{measured} of {shapes} shapes measured, the rest extrapolated by {law}"


def targets_section(summary: dict, dense: dict, checks: dict) -> list[str]:
    torch_time, torch_rss = summary["torch_import"], summary["torch_rss"]
    rows = []
    for key in ("8b", "70b"):
        entry = summary["adapters"].get(key)
        if entry is None:
            continue
        now = entry["now"]
        ratio = now["library"] / now["floor"]
        rows.append((f"{entry['label']}: library ≤ 5 × floor", f"{ratio:.1f}×", ratio <= TARGETS["library_over_floor"]))
        if key == "8b":
            extra = now["cli"] - torch_time
            rows.append(
                ("8B: CLI ≤ `import torch` + 1 s", f"+{extra:.2f} s ({fmt_seconds(now['cli'])} vs "
                 f"{fmt_seconds(torch_time)})", extra <= TARGETS["cli_over_torch_import"])
            )  # fmt: skip
        rss = now["cli_rss"] - torch_rss
        limit = entry["bytes"] + RSS_HEADROOM
        rows.append(
            (f"{entry['label']}: peak RSS − torch's ≤ file + 200 MB", f"{rss / MB:.0f} MB ≤ {limit / MB:.0f} MB",
             rss <= limit)
        )  # fmt: skip
        if key in checks:
            c = checks[key]
            rows.append(
                (f"{entry['label']}: dense ≥ 10,000 × rankscope", f"{fmt_ratio(c['dense_ratio'])} (sampled layers "
                 f"{fmt_ratio(c['dense_ratio_sampled'])})", (c["dense_ratio"] or 0) >= TARGETS["dense_over_rankscope"]
                 and c["dense_ratio_sampled"] >= TARGETS["dense_over_rankscope"])
            )  # fmt: skip
            ww_ok = None if c["ww_ratio"] is None else (
                c["ww_ratio"] >= TARGETS["weightwatcher_over_rankscope"]
                and (c["ww_ratio_sampled"] or 0) >= TARGETS["weightwatcher_over_rankscope"]
            )  # fmt: skip
            rows.append(
                (f"{entry['label']}: WeightWatcher ≥ 1,000 × rankscope", f"{fmt_ratio(c['ww_ratio'])} (sampled "
                 f"layers {fmt_ratio(c['ww_ratio_sampled'])})" if c["ww_ratio"] else "not measured", ww_ok)
            )  # fmt: skip
            if c["sigma_error"] is not None:
                rows.append(
                    (f"{entry['label']}: σ exact (≤ 1e-6 rel.)", f"{c['sigma_error']:.1e}",
                     c["sigma_error"] <= TARGETS["sigma_relative"])
                )  # fmt: skip
    lines = ["## Targets (2 CPU cores)", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {verdict(ok)} |" for name, value, ok in rows]
    return [*lines, ""]


def print_table(summary: dict, checks_text: str) -> None:
    print()
    print(f"{'adapter':<28}{'I/O':>10}{'floor':>10}{'library':>11}{'÷floor':>8}{'CLI':>9}{'RSS−torch':>11}")
    for entry in summary["adapters"].values():
        now = entry["now"]
        print(
            f"{entry['label']:<28}{fmt_seconds(now['io']):>10}{fmt_seconds(now['floor']):>10}"
            f"{fmt_seconds(now['library']):>11}{now['library'] / now['floor']:>7.1f}×{fmt_seconds(now['cli']):>9}"
            f"{(now['cli_rss'] - summary['torch_rss']) / MB:>8.0f} MB"
        )
    print(f"python -c 'import torch': {fmt_seconds(summary['torch_import'])}")
    print()
    print(checks_text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8B shapes only, 3 repeats, small dense samples")
    parser.add_argument("--repeats", type=int, help="runs per measurement (default 5, --quick 3)")
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "benchmarks.md", help="Markdown output")
    parser.add_argument("--before", type=Path, help="a directory holding an older `rankscope` package to compare")
    parser.add_argument("--before-label", help="how the report names --before (e.g. the commit it came from)")
    parser.add_argument("--no-weightwatcher", action="store_true", help="skip WeightWatcher")
    parser.add_argument(
        "--dense-max-cost",
        type=float,
        help="measure dense SVDs up to this m·n·min(m, n) (default 14336·4096² full, 4096³ quick); larger shapes "
        "are extrapolated",
    )
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 5)
    max_cost = args.dense_max_cost or (cost(4096, 4096) if args.quick else cost(14336, 4096))
    dense_path_cost = cost(4096, 4096)
    ww_max_elements = 14336 * 4096 if args.quick else 8192 * 8192
    started = time.perf_counter()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    info = machine()
    log(f"rankscope benchmark ({'quick' if args.quick else 'full'}): {info['cpu']}, torch {info['torch']}")
    with tempfile.TemporaryDirectory(prefix="rankscope-bench-") as tmp:
        root = Path(tmp)
        log("writing adapters …")
        adapters, generation = generate(root, args.quick)
        log("measuring rankscope, the floors and import torch …")
        rows = measure(adapters, args.repeats, args.before, log)
        summary = summarise(adapters, rows)
        dense: dict = {}
        for adapter in adapters:
            if adapter.key not in ("8b", "70b"):
                continue
            log(f"dense baselines on {adapter.label} …")
            samples, extra = run_dense_baselines(
                adapter, root, max_cost, dense_path_cost, ww_max_elements, not args.no_weightwatcher, log
            )
            dense[adapter.key] = {"samples": samples, "info": extra}
    info["load_average_end"] = os.getloadavg()
    report = build_report(info, summary, dense, args, generation, time.perf_counter() - started)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report, encoding="utf-8")
    targets = report[report.index("## Targets") :]
    print_table(summary, targets)
    log(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
