"""Every family at the Llama-3-8B shape (issue 15): library (load + analyze) against the floor, peak RSS, σ exact.

    python benchmarks/families.py [--quick] [--repeats N] [--only NAME,…] [--no-dense]

Factored families (LoRA, rsLoRA, BoRA b=16, MELoRA, HydraLoRA, a k=3 composition, BoostLoRA, LoHa, LoKr, VeRA,
AdaLoRA) are written with all 224 projections of Llama-3-8B (32 layers × q,k,v,o,gate,up,down; 4096/1024/14336),
bf16, seeded random values. The PEFT families take their exact key layout, tensor shapes and adapter_config.json
from PEFT itself: the model is built on the meta device, wrapped by ``get_peft_model`` with the family's config,
and every tensor of ``get_peft_model_state_dict`` is filled with random values (no weights are downloaded). BoRA
and the composition come from ``adapters.py``; MELoRA, HydraLoRA and BoostLoRA follow the layouts their readers
document (the published repositories' save formats). LoRA-FA saves a plain LoRA file (A frozen, same keys): it is
the LoRA row.

Per family, in fresh processes: the floor (read + upcast to float32 + one pass over every tensor of the files, the
faster of 1 thread and torch's default) and the library call ``analyze(load(path))`` under
``rankscope.single_threaded()`` as the CLI runs it, interleaved, medians of ``--repeats`` (``worker.inproc``);
then a second process that only loads and analyses once gives the peak RSS (minus that of ``import torch``); the
same process then checks σ of sampled layers (k_proj and v_proj of layers 0 and 31, 1024×4096) against
``torch.linalg.svdvals`` of the materialised ΔW in float64.

Dense families (DoRA, IA3, PEFT OFT through PEFT's merge, a full fine-tune's ΔW = W − W₀) run on one block of the
8B shape (its 7 projections; ``--quick``: k_proj and v_proj) with a bf16 base file: the library against the dense
baseline, ``torch.linalg.svdvals`` of the materialised ΔW in float64 (torch's threads), on the same matrices
(medians of ``--repeats`` interleaved rounds per layer) — the
spectrum alone (``base_measures=False``, the CLI's ``--no-base-measures``: the base only forms ΔW) against the
target, and beside it the analysis with the base-relative measures the default ``--base`` adds; σ of
DoRA, IA3 and the full delta against ΔW formed here from the file's tensors (PEFT's formulas), independently of
rankscope's readers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from adapters import LLAMA3_8B, PREFIX, ModelShape, file_bytes, write_bora, write_composition, write_lora  # noqa: E402

MB = 1e6
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SAMPLED = re.compile(r"^model\.layers\.(0|31)\.self_attn\.[kv]_proj$")  # 1024×4096: a dense SVD in ~1 s each
TARGET_FLOOR, TARGET_RSS, TARGET_DENSE = 5.0, 300 * MB, 1.1


# -- writing files in each library's layout ----------------------------------------------------------------------
def _llama_meta(shape: ModelShape, layers: int):
    """A Llama model of ``shape`` (``layers`` decoder layers) on the meta device: shapes without memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv_heads = shape.hidden // 128, shape.kv // 128
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=8)  # fmt: skip
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def _fill(key: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Seeded values for a PEFT tensor: multiplicative vectors near 1, factors with a kaiming-like spread."""
    if key.endswith(("ia3_l", "lora_magnitude_vector")):
        return (1 + 0.05 * torch.randn(shape, generator=generator)).to(torch.bfloat16)
    fan = shape[-1] if len(shape) > 1 else 1
    return torch.randn(shape, generator=generator).mul_(fan**-0.5).to(torch.bfloat16)


def write_peft(directory: Path, config, *, layers: int = 32, seed: int = 0) -> Path:
    """A PEFT adapter folder whose keys, shapes and config are PEFT's own for ``config`` on an 8B-shaped model."""
    from peft import get_peft_model, get_peft_model_state_dict

    model = get_peft_model(_llama_meta(LLAMA3_8B, layers), config)
    shapes = {key: value.shape for key, value in get_peft_model_state_dict(model).items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {key: _fill(key, shape, generator) for key, shape in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    model.peft_config["default"].save_pretrained(str(directory))
    return directory


def _config_file(directory: Path, config: dict) -> None:
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=1))


def write_melora(directory: Path, minis: int = 8, rank: int = 2, *, seed: int = 0) -> Path:
    """MELoRA (ChasonShi/MELoRA): ``lora_A.<i>.weight`` (r_i, n/N), ``lora_B.<i>.weight`` (m/N, r_i); Σ r_i = 16."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for path, m, n in LLAMA3_8B.modules():
        for i in range(minis):
            a = torch.randn(rank, n // minis, generator=generator).mul_((n // minis) ** -0.5)
            tensors[f"{PREFIX}{path}.lora_A.{i}.weight"] = a.to(torch.bfloat16)
            tensors[f"{PREFIX}{path}.lora_B.{i}.weight"] = torch.randn(m // minis, rank, generator=generator).mul_(
                0.01).to(torch.bfloat16)  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    _config_file(directory, {"peft_type": "MELORA", "r": [rank] * minis, "lora_alpha": [2.0 * rank] * minis,
                             "target_modules": list(PROJECTIONS)})  # fmt: skip
    return directory


def write_hydra(directory: Path, heads: int = 3, rank: int = 8, *, seed: int = 0) -> Path:
    """HydraLoRA (peft 0.3 fork): shared ``lora_A.weight``, heads ``lora_B<i>.weight``, router ``lora_route``."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for path, m, n in LLAMA3_8B.modules():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = torch.randn(rank, n, generator=generator).mul_(n**-0.5).to(
            torch.bfloat16)  # fmt: skip
        for i in range(heads):
            b = torch.randn(m, rank, generator=generator).mul_(0.01)
            tensors[f"{PREFIX}{path}.lora_B{i}.weight"] = b.to(torch.bfloat16)
        route = torch.randn(heads, n, generator=generator).mul_(n**-0.5)
        tensors[f"{PREFIX}{path}.lora_route.weight"] = route.to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    _config_file(directory, {"peft_type": "LORA", "r": rank, "lora_alpha": 2.0 * rank, "lora_nums": heads,
                             "target_modules": list(PROJECTIONS)})  # fmt: skip
    return directory


def write_boostlora(directory: Path, components: int = 3, rank: int = 8, *, seed: int = 0) -> Path:
    """BoostLoRA single file: ``lora_A.<i>.weight``, ``lora_B.<i>.weight`` and ``boost_weights`` (k,) per module."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for path, m, n in LLAMA3_8B.modules():
        for i in range(components):
            a = torch.randn(rank, n, generator=generator).mul_(n**-0.5)
            tensors[f"{PREFIX}{path}.lora_A.{i}.weight"] = a.to(torch.bfloat16)
            b = torch.randn(m, rank, generator=generator).mul_(0.01)
            tensors[f"{PREFIX}{path}.lora_B.{i}.weight"] = b.to(torch.bfloat16)
        tensors[f"{PREFIX}{path}.boost_weights"] = torch.tensor([0.6, 0.3, 0.2][:components], dtype=torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    _config_file(directory, {"peft_type": "BOOSTLORA", "r": rank, "lora_alpha": 2.0 * rank, "use_rslora": False,
                             "num_components": components, "weight_normalization": "none", "mode": "sum"})  # fmt: skip
    return directory


def write_rslora(directory: Path, *, seed: int = 0) -> Path:
    write_lora(directory, LLAMA3_8B, 16, seed=seed)
    config = json.loads((directory / "adapter_config.json").read_text())
    _config_file(directory, {**config, "use_rslora": True})
    return directory


def factored_families(root: Path, only: set[str] | None) -> dict[str, tuple[Path, str]]:
    """name → (path, what it is); written on demand."""
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, VeraConfig

    t = list(PROJECTIONS)
    table = {
        "LoRA r=16 (also LoRA-FA)": lambda p: write_lora(p, LLAMA3_8B, 16),
        "rsLoRA r=16": write_rslora,
        "BoRA r=8 b=16": lambda p: write_bora(p, LLAMA3_8B, 8, 16),
        "MELoRA 8 minis r=2": write_melora,
        "HydraLoRA 3 heads r=8": write_hydra,
        "composition k=3 r=8": lambda p: write_composition(p, LLAMA3_8B, 3, 8),
        "BoostLoRA k=3 r=8": write_boostlora,
        "LoHa r=8": lambda p: write_peft(p, LoHaConfig(r=8, alpha=16, target_modules=t)),
        "LoKr r=8": lambda p: write_peft(p, LoKrConfig(r=8, alpha=16, target_modules=t)),
        "VeRA r=256": lambda p: write_peft(p, VeraConfig(r=256, target_modules=t)),
        "AdaLoRA r=12": lambda p: write_peft(
            p, AdaLoraConfig(init_r=12, target_r=8, lora_alpha=16, target_modules=t, total_step=1000)
        ),
    }
    out = {}
    for i, (name, build) in enumerate(table.items()):
        if only and not any(word.lower() in name.lower() for word in only):
            continue
        out[name] = (build(root / f"factored-{i}"), name)
    return out


def write_base(path: Path, modules: tuple[str, ...], seed: int = 100) -> dict[str, torch.Tensor]:
    """W₀ of layer 0's ``modules`` in bf16 (a base model's file, HF keys)."""
    shapes = {name: (m, n) for name, m, n in LLAMA3_8B.modules()[:7]}
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, (m, n) in shapes.items():
        if name.rsplit(".", 1)[-1] in modules:
            weights[f"{name}.weight"] = torch.randn(m, n, generator=generator).mul_(0.02).to(torch.bfloat16)
    save_file(weights, str(path))
    return weights


def dense_families(root: Path, modules: tuple[str, ...], only: set[str] | None) -> tuple[Path, dict]:
    """(base file, name → (path, load options)) on one block of the 8B shape."""
    from peft import IA3Config, LoraConfig, OFTConfig

    base = root / "base.safetensors"
    weights = write_base(base, modules)
    ff = [m for m in modules if m in MLP]
    full = root / "full-ft.safetensors"
    generator = torch.Generator().manual_seed(7)
    tuned = {k: (w.float() + torch.randn(w.shape, generator=generator).mul_(2e-3)).to(torch.bfloat16)
             for k, w in weights.items()}  # fmt: skip
    save_file(tuned, str(full))
    del tuned
    table = {
        "DoRA r=16": lambda p: write_peft(
            p, LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=list(modules)), layers=1
        ),
        "IA3": lambda p: write_peft(p, IA3Config(target_modules=list(modules), feedforward_modules=ff), layers=1),
        "OFT block 32 (PEFT merge)": lambda p: write_peft(
            p, OFTConfig(r=0, oft_block_size=32, target_modules=list(modules)), layers=1
        ),
        "full fine-tune ΔW = W − W₀": lambda p: full,
    }
    out = {}
    for i, (name, build) in enumerate(table.items()):
        if only and not any(word.lower() in name.lower() for word in only):
            continue
        out[name] = build(root / f"dense-{i}")
    return base, out


# -- tasks, each in a fresh process ----------------------------------------------------------------------------
def _peak_rss() -> int:
    """This process's peak RSS since its exec (VmHWM): ``ru_maxrss`` would keep the forking driver's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _max_rel_error(ours, dense: torch.Tensor) -> float:
    ours = torch.as_tensor(ours, dtype=torch.float64)
    n = min(len(ours), len(dense))
    ours, dense = ours[:n], dense[:n]
    keep = dense >= 1e-6 * dense[0]
    return float(((ours - dense).abs() / dense)[keep].max())


def task_rss(path: str) -> dict:
    """Peak RSS of one load + analyse, then σ of the sampled layers against svdvals of the materialised ΔW."""
    import rankscope

    with rankscope.single_threaded():
        start = time.perf_counter()
        checkpoint = rankscope.load(path)
        analysis = rankscope.analyze(checkpoint)
        seconds = time.perf_counter() - start
    peak = _peak_rss()
    records = {record.name: record for record in analysis}
    worst, sampled = 0.0, 0
    for layer in checkpoint.layers:
        if layer.update is None or not SAMPLED.match(layer.name) or layer.name not in records:
            continue
        dense = torch.linalg.svdvals(layer.update.materialize(torch.float64))
        worst, sampled = max(worst, _max_rel_error(records[layer.name].singular_values, dense)), sampled + 1
    return {"peak_rss": peak, "seconds": seconds, "layers": len(analysis), "sigma_error": worst, "sampled": sampled,
            "invalid": sum(1 for r in analysis if not r.valid)}  # fmt: skip


def _independent_delta(family: str, path: Path, base: Path, name: str) -> torch.Tensor | None:
    """ΔW of ``name`` from the files by PEFT's formulas in float64 (None where no formula is written here)."""
    from safetensors import safe_open

    def get(file: Path, key: str) -> torch.Tensor:
        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(key).double()

    w0 = get(base, f"{name}.weight")
    if family.startswith("full"):
        return get(path, f"{name}.weight") - w0
    file, key = path / "adapter_model.safetensors", f"base_model.model.{name}"
    config = json.loads((path / "adapter_config.json").read_text())
    if family.startswith("IA3"):  # feedforward: l (1, in) scales the input; else l (out, 1) the output
        return (get(file, f"{key}.ia3_l") - 1) * w0
    if family.startswith("DoRA"):  # W′ = m · V / ‖V‖_row, V = W₀ + (α/r)·B·A
        v = w0 + config["lora_alpha"] / config["r"] * get(file, f"{key}.lora_B.weight") @ get(
            file, f"{key}.lora_A.weight"
        )
        m = get(file, f"{key}.lora_magnitude_vector").reshape(-1, 1)
        return m * v / torch.linalg.vector_norm(v, dim=1, keepdim=True) - w0
    return None


def task_dense(family: str, path: str, base: str, repeats: int = 1) -> dict:
    """Per layer, interleaved (order rotating, so the machine's drift hits all three): the library's spectrum of that
    layer (``base_measures=False``: the base only forms ΔW), its analysis with the base-relative measures (the
    default with ``--base``; the first round of a run also pays W₀'s SVD into the on-disk cache), and the baseline
    (materialise ΔW in float64 + ``svdvals``, torch's threads) on the same layer; each the median of ``repeats``
    rounds (one ``svdvals`` of a 1024×4096 matrix moves ±15 % between calls on this host)."""
    import rankscope

    with rankscope.single_threaded():
        start = time.perf_counter()
        checkpoint = rankscope.load(path, base=base)  # the full fine-tune's W₀ too
        load = time.perf_counter() - start
    rows = {}
    for i, layer in enumerate(checkpoint.layers):

        def library(measured: bool, name=layer.name):
            with rankscope.single_threaded():
                t0 = time.perf_counter()
                (record,) = rankscope.analyze(checkpoint, layers=f"^{re.escape(name)}$", base_measures=measured)
                return record, time.perf_counter() - t0

        def baseline(update=layer.update):
            t0 = time.perf_counter()
            delta = update.materialize(torch.float64)
            t1 = time.perf_counter()
            sigma = torch.linalg.svdvals(delta)
            return sigma, t1 - t0, time.perf_counter() - t1

        runs = {"spectrum": lambda: library(False), "measured": lambda: library(True), "baseline": baseline}
        rounds = []
        for round_ in range(repeats):
            order = list(runs)[(i + round_) % 3 :] + list(runs)[: (i + round_) % 3]
            rounds.append({what: runs[what]() for what in order})
        record = rounds[0]["spectrum"][0]
        seconds = statistics.median(done["spectrum"][1] for done in rounds)
        measured_seconds = statistics.median(done["measured"][1] for done in rounds)
        sigma = rounds[0]["baseline"][0]
        materialise = statistics.median(done["baseline"][1] for done in rounds)
        svd = statistics.median(done["baseline"][2] for done in rounds)
        reference = _independent_delta(family, Path(path), Path(base), layer.name)
        against = "materialised ΔW"
        if reference is not None:
            sigma = torch.linalg.svdvals(reference)
            against = "W − W₀ from the files" if family.startswith("full") else "ΔW by PEFT's formula"
        rows[layer.name] = {"shape": list(layer.update.shape), "library": seconds, "measured": measured_seconds,
                            "materialise": materialise, "svdvals": svd,
                            "error": _max_rel_error(record.singular_values, sigma),
                            "against": against, "exact": record.exact}  # fmt: skip
    return {"load": load, "analyze": sum(r["library"] for r in rows.values()),
            "measured": sum(r["measured"] for r in rows.values()), "peak_rss": _peak_rss(),
            "layers": rows, "threads": torch.get_num_threads()}  # fmt: skip


TASKS = {"rss": task_rss, "dense": task_dense}


def run_task(task: str, timeout: float = 1800, **arguments) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--task", task, json.dumps(arguments)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # a cold base-SVD cache of this run's own (the dense families' --base measures), never the user's
    env.setdefault("RANKSCOPE_CACHE", str(Path(arguments.get("path", ".")).parent / "svd-cache"))
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    marker = done.stdout.rfind("@@RESULT@@")
    if done.returncode != 0 or marker < 0:
        raise RuntimeError(f"{task} {arguments} failed: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout[marker + len("@@RESULT@@") :])


# -- the driver ---------------------------------------------------------------------------------------------------
def measure_factored(families: dict, repeats: int, torch_rss: float) -> list[dict]:
    from run import worker

    rows = []
    for name, (path, _) in families.items():
        timing = worker("inproc", path=str(path), repeats=repeats)["times"]
        floor = min(statistics.median(timing["floor_1"]), statistics.median(timing["floor_default"]))
        library = statistics.median(timing["library"])
        rss = run_task("rss", path=str(path))
        size = file_bytes(path)
        row = {"family": name, "floor": floor, "library": library, "load": statistics.median(timing["load"]),
               "analyze": statistics.median(timing["analyze"]), "ratio": library / floor,
               "rss": rss["peak_rss"] - torch_rss, "file": size, "error": rss["sigma_error"],
               "sampled": rss["sampled"], "layers": rss["layers"], "invalid": rss["invalid"]}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def measure_dense(families: dict, base: Path, torch_rss: float, repeats: int) -> list[dict]:
    rows = []
    for name, path in families.items():
        result = run_task("dense", family=name, path=str(path), base=str(base), repeats=repeats)
        layers = result["layers"].values()
        svd = sum(r["svdvals"] for r in layers)
        materialise = sum(r["materialise"] for r in layers)
        library = result["load"] + result["analyze"]
        measured = result["load"] + result["measured"]
        row = {"family": name, "layers": len(result["layers"]), "library": library, "load": result["load"],
               "measured": measured, "measured_ratio": measured / svd,
               "svdvals": svd, "materialise": materialise, "ratio": library / svd,
               "ratio_with_materialise": library / (svd + materialise), "rss": result["peak_rss"] - torch_rss,
               "error": max(r["error"] for r in layers), "against": sorted({r["against"] for r in layers}),
               "exact": all(r["exact"] for r in layers),
               "per_layer": {f"{name.rsplit('.', 1)[-1]} {'×'.join(map(str, r['shape']))}": r
                             for name, r in result["layers"].items()}}  # fmt: skip
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_layer"}), file=sys.stderr, flush=True)
    return rows


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def print_tables(factored: list[dict], dense: list[dict], dense_modules: tuple[str, ...]) -> None:
    if factored:
        print("| family (8B shape, 224 projections) | file | floor | library (load + analyze) | lib ÷ floor "
              "| peak RSS − torch's | ≤ file + 300 MB | σ max rel. error (sampled) |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for r in factored:
            met = "met" if r["ratio"] <= TARGET_FLOOR else "**not met**"
            rss_met = "met" if r["rss"] <= r["file"] + TARGET_RSS else "**not met**"
            print(
                f"| {r['family']} | {r['file'] / MB:.0f} MB | {_seconds(r['floor'])} | {_seconds(r['library'])} "
                f"({_seconds(r['load'])} + {_seconds(r['analyze'])}) | {r['ratio']:.1f}× ({met}) "
                f"| {r['rss'] / MB:.0f} MB | {rss_met} | {r['error']:.1e} ({r['sampled']} layers) |"
            )
    if dense:
        print()
        print(f"Dense families, layer 0's {', '.join(dense_modules)} of the 8B shape:")
        print()
        print("| family | layers | spectrum (load + analyze, `--no-base-measures`) | float64 `svdvals` "
              "| spectrum ÷ svdvals | (÷ materialise + svdvals) | with the base measures (÷ svdvals) "
              "| peak RSS − torch's | σ max rel. error |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for r in dense:
            met = "met" if r["ratio"] <= TARGET_DENSE else "**not met**"
            print(
                f"| {r['family']} | {r['layers']} | {_seconds(r['library'])} (load {_seconds(r['load'])}) "
                f"| {_seconds(r['svdvals'])} | {r['ratio']:.2f}× ({met}) | {r['ratio_with_materialise']:.2f}× "
                f"| {_seconds(r['measured'])} ({r['measured_ratio']:.2f}×) "
                f"| {r['rss'] / MB:.0f} MB | {r['error']:.1e} (vs {', '.join(r['against'])}) |"
            )
        print()
        for r in dense:
            shapes = "; ".join(f"{k}: spectrum {_seconds(v['library'])}, with the base measures "
                               f"{_seconds(v['measured'])}, svdvals {_seconds(v['svdvals'])}, "
                               f"materialise {_seconds(v['materialise'])}"
                               for k, v in r["per_layer"].items())  # fmt: skip
            print(f"- {r['family']}: {shapes}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats; dense families on k_proj and v_proj only")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", default=None, help="comma-separated words: only families whose name has one")
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--no-factored", action="store_true")
    parser.add_argument(
        "--dense-modules",
        default=None,
        help="comma-separated projections of layer 0 for the dense families (default: all 7; --quick: k_proj,v_proj)",
    )
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    from run import timed_process

    only = {w.strip() for w in args.only.split(",")} if args.only else None
    repeats = args.repeats or (2 if args.quick else 3)
    dense_modules = ("k_proj", "v_proj") if args.quick else PROJECTIONS
    if args.dense_modules:
        dense_modules = tuple(m for m in PROJECTIONS if m in args.dense_modules.split(","))
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), os.getloadavg()
    torch_rss = statistics.median(timed_process([sys.executable, "-c", "import torch"])[1] for _ in range(3))
    with tempfile.TemporaryDirectory(prefix="rankscope-families-") as tmp:
        root = Path(tmp)
        factored, dense = [], []
        if not args.no_factored:
            written = time.perf_counter()
            families = factored_families(root, only)
            print(f"factored files written in {time.perf_counter() - written:.1f} s", file=sys.stderr, flush=True)
            factored = measure_factored(families, repeats, torch_rss)
        if not args.no_dense:
            base, families = dense_families(root, dense_modules, only)
            dense = measure_dense(families, base, torch_rss, repeats)
    print(f"{started} → {time.strftime('%H:%M UTC', time.gmtime())}; load average at start {load_start}, at end "
          f"{os.getloadavg()}; {os.cpu_count()} cores; torch {torch.__version__}; `import torch` peak RSS "
          f"{torch_rss / MB:.0f} MB; medians of {repeats} interleaved rounds")  # fmt: skip
    print()
    print_tables(factored, dense, dense_modules)
    if args.json:
        Path(args.json).write_text(json.dumps({"factored": factored, "dense": dense}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--task":
        result = TASKS[sys.argv[2]](**json.loads(sys.argv[3]))
        sys.stdout.write("\n@@RESULT@@" + json.dumps(result) + "\n")
        sys.exit(0)
    sys.exit(main())
