"""Fine-tune the seeds' adapter families for real on the tiny base model, save each where rankscope reads it.

The frozen base is ``tiny-base`` (pre-trained on English prose by ``train_lora.py``; loaded, never retrained).
Every adapter is fine-tuned on the same task as ``tiny-lora``: next-byte prediction on the Python source of the
``json``, ``http`` and ``email`` standard-library packages, with the same batches, optimiser, schedule and
learning rate. Each family runs its own forward pass, written here from its paper:

  lora-r8, lora-r32, dora-r8   PEFT (``LoraConfig``; DoRA is ``use_dora=True``), saved by ``save_pretrained``
  lora-r8-alpha16e             control for BoRA: LoRA r=8 at e times the scale (BoRA's Σ starts at e·I)
  bora-r8-b8, bora-r8-b4       BoRA: y_j = s·Σ_k B_j Σ_jk A_k x_k, Σ_jk = diag(exp(σ_jk / mean|σ|))
  melora-8x1                   MELoRA: 8 mini LoRAs of rank 1 on 8 input/output slices (equivalent rank 8)
  hydralora-r8-h3              HydraLoRA: shared A, 3 heads B_i, per-token softmax router
  boostlora-sum-k2, -k3        weighted sum Σ_i softmax(logits)_i·s·B_i A_i of k rank-4 LoRAs, logits per module
  boostlora-seq-k3             3 boosting rounds of a rank-4 PEFT LoRA, each trained (a third of the steps) on
                               the quarter of 1024 training windows the current model predicts worst, then
                               merged and frozen; saved as a sequential composition.json over round1..round3

Outputs under ``--out`` (default ``examples/checkpoints/``): ``adapters/<name>/`` and ``adapters.json`` (per
adapter: trainable parameters, validation loss on the code corpus, training time, seed, steps, path, checks).
Each saved adapter is then loaded back: PEFT's reload must reproduce the trained logits (LoRA, DoRA, the rounds),
and rankscope's singular values of every layer must equal those of ΔW = wrapper(I) − base(I) computed by running
the trained module itself in float64 (HydraLoRA: each head and the uniform-router mean). The exit status is 1 if
any check fails.

    python examples/train_adapters.py                      # full run: 300 steps each, minutes on 2 cores
    python examples/train_adapters.py --quick --out /tmp/x # smoke test: a few steps of everything
    python examples/train_adapters.py --only bora-r8-b8,lora-r8 --out /tmp/x

Timing: about 2 minutes on 2 idle cores. On a machine whose cores other jobs share, two torch threads can be ten
times slower (each tiny matrix product waits for both threads); ``--threads 1`` writes bitwise the same files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # PEFT must never touch the network here

import peft
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lora import CONFIG, SEED, TARGETS, TinyLM, batch, code_corpus, evaluate, prose_corpus, split

import rankscope

HERE = Path(__file__).resolve().parent
PREFIX = "base_model.model."  # PEFT's key prefix; rankscope strips it to name layers like the base model
LR = 1e-2  # as tiny-lora; every adapter gets the same
SPECTRUM_TOLERANCE = 1e-6  # rankscope's σ vs the trained module's ΔW, relative to σ₁ (both float64)
LOGIT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Settings:
    steps: int
    batch_size: int
    n_eval: int
    pool: int  # training windows scored before each boosting round
    hard_fraction: float = 0.25  # a round trains on this fraction of the pool: the highest-loss windows
    seed: int = SEED  # batches come from a generator seeded `seed`; adapters are initialised from `seed + 1`

    @property
    def init_seed(self) -> int:
        return self.seed + 1  # tiny-lora's choice for seed 0


FULL = Settings(steps=300, batch_size=16, n_eval=64, pool=1024)
QUICK = Settings(steps=3, batch_size=4, n_eval=8, pool=32)


# ----------------------------------------------------------------------------- adapter modules
def lora_a(rows: int, cols: int) -> torch.Tensor:
    """A's usual init (PEFT's and nn.Linear's): Kaiming-uniform with a = √5, fan-in = cols."""
    weight = torch.empty(rows, cols)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


class BoRA(nn.Module):
    """BoRA (arXiv 2508.06953): A = [A_1 … A_b] (column blocks), B = [B_1; …; B_b] (row blocks), σ ∈ R^{b×b×r}.

    Output block j: y_j = s·Σ_k B_j Σ_jk A_k x_k with Σ_jk = diag(exp(σ_jk / mean|σ|)), s = α/r. σ starts at 1
    everywhere, so Σ_jk = e·I and BoRA starts as LoRA (σ/mean|σ| has mean |·| = 1: Σ = I is not reachable).
    """

    def __init__(self, n: int, m: int, rank: int, blocks: int, alpha: float):
        super().__init__()
        self.blocks, self.scale = blocks, alpha / rank
        self.lora_A = nn.Parameter(lora_a(rank, n))
        self.lora_B = nn.Parameter(torch.zeros(m, rank))
        self.lora_sigma = nn.Parameter(torch.ones(blocks, blocks, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.blocks
        z = torch.einsum("...kc,rkc->...kr", x.unflatten(-1, (b, -1)), self.lora_A.unflatten(1, (b, -1)))  # A_k x_k
        sigma = torch.exp(self.lora_sigma / self.lora_sigma.abs().mean())  # (j, k, r): diagonal of Σ_jk
        mixed = torch.einsum("...kr,jkr->...jr", z, sigma)  # Σ_k Σ_jk A_k x_k, per output block j
        y = torch.einsum("...jr,jor->...jo", mixed, self.lora_B.unflatten(0, (b, -1)))  # B_j · (…)
        return self.scale * y.flatten(-2)

    def export(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B, "lora_sigma": self.lora_sigma}


class MELoRA(nn.Module):
    """MELoRA (Ren et al., ACL 2024): n minis on n input and output slices, y_i = (α/r)·B_i A_i x_i, concatenated.

    ΔW = blockdiag_i(s·B_i A_i); each A_i is initialised as its own nn.Linear(in/n, r) would be.
    """

    def __init__(self, n: int, m: int, rank: int, minis: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.stack([lora_a(rank, n // minis) for _ in range(minis)]))  # (minis, r, n')
        self.lora_B = nn.Parameter(torch.zeros(minis, m // minis, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("...ic,irc->...ir", x.unflatten(-1, (len(self.lora_A), -1)), self.lora_A)
        return self.scale * torch.einsum("...ir,ior->...io", z, self.lora_B).flatten(-2)

    def export(self) -> dict[str, torch.Tensor]:
        tensors = {f"lora_A.{i}.weight": a for i, a in enumerate(self.lora_A)}
        return tensors | {f"lora_B.{i}.weight": b for i, b in enumerate(self.lora_B)}


class HydraLoRA(nn.Module):
    """HydraLoRA (Tian et al., NeurIPS 2024): y = s·Σ_i softmax(W_route x)_i · B_i A x, shared A, N heads B_i.

    ``fixed_route`` (N weights) replaces the router, for the checks: a one-hot picks head i, 1/N the uniform mean.
    """

    def __init__(self, n: int, m: int, rank: int, heads: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(lora_a(rank, n))
        self.lora_B = nn.Parameter(torch.zeros(heads, m, rank))
        self.lora_route = nn.Parameter(lora_a(heads, n))  # Kaiming-uniform like the official nn.Linear router
        self.fixed_route: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_route is None:
            route = torch.softmax(x @ self.lora_route.T, dim=-1)  # (..., N), per token
        else:
            route = self.fixed_route.to(x.dtype).expand(*x.shape[:-1], -1)
        heads = torch.einsum("...r,hor->...ho", x @ self.lora_A.T, self.lora_B)  # B_i A x for every head
        return self.scale * torch.einsum("...h,...ho->...o", route, heads)

    def export(self) -> dict[str, torch.Tensor]:
        heads = {f"lora_B{i}.weight": b for i, b in enumerate(self.lora_B)}  # no dot before i, as published
        return {"lora_A.weight": self.lora_A, **heads, "lora_route.weight": self.lora_route}


class BoostSum(nn.Module):
    """BoostLoRA weighted sum: ΔW = Σ_i softmax(logits)_i · s·B_i A_i, k rank-r components, logits per module."""

    def __init__(self, n: int, m: int, rank: int, components: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.stack([lora_a(rank, n) for _ in range(components)]))  # (k, r, n)
        self.lora_B = nn.Parameter(torch.zeros(components, m, rank))
        self.boost_weights = nn.Parameter(torch.zeros(components))  # logits: uniform 1/k at the start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        each = torch.einsum("...kr,kor->...ko", torch.einsum("...n,krn->...kr", x, self.lora_A), self.lora_B)
        return self.scale * torch.einsum("...ko,k->...o", each, torch.softmax(self.boost_weights, dim=0))

    def export(self) -> dict[str, torch.Tensor]:
        tensors = {f"lora_A.{i}.weight": a for i, a in enumerate(self.lora_A)}
        tensors |= {f"lora_B.{i}.weight": b for i, b in enumerate(self.lora_B)}
        return tensors | {"boost_weights": self.boost_weights}


class Adapted(nn.Module):
    """A frozen base nn.Linear plus an adapter: y = base_layer(x) + adapter(x)."""

    def __init__(self, base_layer: nn.Linear, adapter: nn.Module):
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.adapter(x)


def target_paths(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS]


def attach(model: nn.Module, make: Callable[[int, int], nn.Module]) -> dict[str, Adapted]:
    """Freeze ``model`` and wrap each target nn.Linear (in n, out m) with ``make(n, m)``; returns path → wrapper."""
    model.requires_grad_(False)
    wrapped = {}
    for path in target_paths(model):
        parent, _, leaf = path.rpartition(".")
        base_layer = model.get_submodule(path)
        wrapped[path] = Adapted(base_layer, make(base_layer.in_features, base_layer.out_features))
        setattr(model.get_submodule(parent), leaf, wrapped[path])
    return wrapped


def exported(wrapped: dict[str, Adapted]) -> dict[str, torch.Tensor]:
    """The state dict in PEFT's key style; every tensor its own copy (views would drag their storage along)."""
    return {
        f"{PREFIX}{path}.{key}": tensor.detach().clone().contiguous()
        for path, wrapper in wrapped.items()
        for key, tensor in wrapper.adapter.export().items()
    }


@torch.no_grad()
def delta_weight(wrapper: nn.Module) -> torch.Tensor:
    """ΔW (out × in) of a trained wrapper, run in float64 on the identity: wrapper(I) − base_layer(I), transposed."""
    module = copy.deepcopy(wrapper).double()
    eye = torch.eye(module.base_layer.in_features, dtype=torch.float64)
    return (module(eye) - module.base_layer(eye)).T


def hydra_deltas(wrapper: Adapted) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each head's ΔW_i = s·B_i A (one-hot route) and the uniform-router mean, from the trained forward pass."""
    heads = len(wrapper.adapter.lora_B)

    def routed(weights: torch.Tensor) -> torch.Tensor:
        probe = copy.deepcopy(wrapper)
        probe.adapter.fixed_route = weights
        return delta_weight(probe)

    return [routed(torch.eye(heads, dtype=torch.float64)[i]) for i in range(heads)], routed(
        torch.full((heads,), 1.0 / heads, dtype=torch.float64)
    )


# ----------------------------------------------------------------------------- training
def fit(model: nn.Module, sample: Callable[[torch.Generator], tuple], settings: Settings, tag: str, val) -> float:
    """AdamW with tiny-lora's schedule (20-step warm-up, linear decay); batches from ``sample(generator)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * (1 - s / settings.steps))
    gen = torch.Generator().manual_seed(settings.seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(1, settings.steps + 1):
        x, y = sample(gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == settings.steps or step % max(1, settings.steps // 3) == 0:
            print(f"  [{tag}] step {step:4d}/{settings.steps}  train {loss.item():.4f}  val {val(model):.4f}")
    return loss.item()


def windows(data: torch.Tensor, starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([data[s : s + CONFIG["max_seq_len"] + 1] for s in starts])
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def hardest_windows(model: nn.Module, data: torch.Tensor, settings: Settings) -> tuple[list[int], float]:
    """The starts of the highest-loss ``hard_fraction`` of ``pool`` evenly spaced training windows, and their loss."""
    starts = torch.linspace(0, len(data) - CONFIG["max_seq_len"] - 1, settings.pool).long().tolist()
    model.eval()
    losses = []
    for i in range(0, len(starts), 64):
        x, y = windows(data, starts[i : i + 64])
        losses.append(F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(dim=1))
    model.train()
    top = torch.cat(losses).topk(max(1, int(settings.pool * settings.hard_fraction)))
    return [starts[i] for i in top.indices.tolist()], top.values.mean().item()


# ----------------------------------------------------------------------------- the run
@dataclass
class Context:
    settings: Settings
    base_dir: Path
    out: Path
    code_train: torch.Tensor
    code_val: torch.Tensor
    prose_val: torch.Tensor
    problems: list[str] = field(default_factory=list)

    def fresh_base(self) -> TinyLM:
        model = TinyLM(CONFIG)
        model.load_state_dict(load_file(self.base_dir / "model.safetensors"))
        return model

    def uniform_batches(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return batch(self.code_train, self.settings.batch_size, gen)

    def val(self, model: nn.Module) -> float:
        return evaluate(model, self.code_val, self.settings.n_eval)

    def probe(self) -> torch.Tensor:
        return self.code_val[: CONFIG["max_seq_len"]].unsqueeze(0)


def write_config(directory: Path, config: dict) -> None:
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def save_peft(peft_model, directory: Path) -> None:
    # PEFT stores target_modules as a set (saved in hash-seed order); sort it so the JSON is stable
    peft_model.peft_config["default"].target_modules = sorted(TARGETS)
    peft_model.save_pretrained(directory)
    (directory / "README.md").unlink(missing_ok=True)  # PEFT's model-card template: not part of the format


def spectrum_error(path: Path, references: dict, *, base: Path | None = None, components: dict | None = None) -> float:
    """Largest |σ_rankscope − σ_reference| / σ₁ over the layers (and components) rankscope reads at ``path``."""
    analysis = rankscope.analyze(rankscope.load(path, base=base))
    if analysis.invalid or {r.name for r in analysis} != set(references):
        raise AssertionError(f"{path}: rankscope read {[r.name for r in analysis]}, invalid {analysis.invalid}")
    worst = 0.0

    def compare(got: list[float], delta: torch.Tensor) -> float:
        expected = torch.linalg.svdvals(delta)
        got_t = torch.tensor(got, dtype=torch.float64)
        tail = expected[len(got_t) :]  # beyond rankscope's rank bound the reference must vanish
        error = max((got_t - expected[: len(got_t)]).abs().max().item(), tail.max().item() if len(tail) else 0.0)
        return error / max(expected[0].item(), 1e-30)

    for record in analysis:
        worst = max(worst, compare(record.singular_values, references[record.name]))
        for i, component in enumerate(record.components if components else []):
            worst = max(worst, compare(component.singular_values, components[record.name][i]))
    return worst


def logits_error(model: nn.Module, reloaded: nn.Module, probe: torch.Tensor) -> float:
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        return (model(probe) - reloaded(probe)).abs().max().item()


def train_peft(ctx: Context, name: str, spec: dict) -> dict:
    config = LoraConfig(
        r=spec["r"],
        lora_alpha=spec["alpha"],
        target_modules=TARGETS,
        lora_dropout=0.0,
        use_dora=spec.get("use_dora", False),
    )
    frozen = ctx.fresh_base()  # built before seeding: TinyLM's own init draws from the global generator
    torch.manual_seed(ctx.settings.init_seed)
    model = get_peft_model(frozen, config)
    train_loss = fit(model, ctx.uniform_batches, ctx.settings, name, ctx.val)
    directory = ctx.out / "adapters" / name
    save_peft(model, directory)
    reloaded = PeftModel.from_pretrained(ctx.fresh_base(), directory)
    layers = {path: delta_weight(model.base_model.model.get_submodule(path)) for path in target_paths(ctx.fresh_base())}
    base = ctx.base_dir if spec.get("use_dora") else None  # DoRA's ΔW needs the base weight
    checks = {
        "peft_reload_max_abs_logit_diff": logits_error(model, reloaded, ctx.probe()),
        "rankscope_max_rel_sigma_error": spectrum_error(directory, layers, base=base),
    }
    return {"model": model, "train_loss": train_loss, "checks": checks}


MODULES = {"bora": BoRA, "melora": MELoRA, "hydralora": HydraLoRA, "boostlora_sum": BoostSum}


def custom_config(kind: str, spec: dict) -> dict:
    """adapter_config.json of the layouts rankscope documents for these families (rankscope/formats/*.py)."""
    common = {"target_modules": sorted(TARGETS), "base_model_name_or_path": None, "bias": "none"}
    if kind == "bora":
        return {"peft_type": "BORA", "r": spec["r"], "lora_alpha": spec["alpha"], "use_rslora": False, **common}
    if kind == "melora":
        return {
            "peft_type": "MELORA",
            "r": [spec["r"]] * spec["minis"],
            "lora_alpha": [spec["alpha"]] * spec["minis"],
            **common,
        }
    if kind == "hydralora":  # the HydraLoRA fork writes PEFT's LORA type plus lora_nums
        return {"peft_type": "LORA", "r": spec["r"], "lora_alpha": spec["alpha"], "lora_nums": spec["heads"], **common}
    return {
        "peft_type": "BOOSTLORA",
        "r": spec["r"],
        "lora_alpha": spec["alpha"],
        "use_rslora": False,
        "num_components": spec["components"],
        "weight_normalization": "softmax",
        "mode": "sum",
        **common,
    }


def train_custom(ctx: Context, name: str, spec: dict) -> dict:
    kind = spec["kind"]
    extra = {"bora": "blocks", "melora": "minis", "hydralora": "heads", "boostlora_sum": "components"}[kind]
    model = ctx.fresh_base()
    torch.manual_seed(ctx.settings.init_seed)
    wrapped = attach(model, lambda n, m: MODULES[kind](n, m, spec["r"], spec[extra], spec["alpha"]))
    train_loss = fit(model, ctx.uniform_batches, ctx.settings, name, ctx.val)
    directory = ctx.out / "adapters" / name
    directory.mkdir(parents=True, exist_ok=True)
    write_config(directory, custom_config(kind, spec))
    tensors = exported(wrapped)
    if kind in ("melora", "hydralora"):  # both official codes write a torch.save'd adapter_model.bin
        torch.save(tensors, directory / "adapter_model.bin")
    else:
        save_file(tensors, directory / "adapter_model.safetensors")
    checks = {}
    if kind == "hydralora":
        per_module = {path: hydra_deltas(wrapper) for path, wrapper in wrapped.items()}
        layers = {path: mean for path, (_, mean) in per_module.items()}
        heads = {path: each for path, (each, _) in per_module.items()}
        checks["rankscope_max_rel_sigma_error"] = spectrum_error(directory, layers, components=heads)
    else:
        layers = {path: delta_weight(wrapper) for path, wrapper in wrapped.items()}
        checks["rankscope_max_rel_sigma_error"] = spectrum_error(directory, layers)
    if kind == "boostlora_sum":  # rankscope must apply exactly the softmax of the stored logits
        records = {r.name: r for r in rankscope.analyze(rankscope.load(directory))}
        checks["max_weight_error"] = max(
            (
                torch.tensor(records[p].composition["weights"]["normalized"], dtype=torch.float64)
                - torch.softmax(w.adapter.boost_weights.detach().double(), 0)
            )
            .abs()
            .max()
            .item()
            for p, w in wrapped.items()
        )
    return {"model": model, "train_loss": train_loss, "checks": checks}


def train_rounds(ctx: Context, name: str, spec: dict) -> dict:
    """Boosting rounds: each a PEFT LoRA trained on the current model's hardest windows, then merged (frozen)."""
    directory = ctx.out / "adapters" / name
    model = ctx.fresh_base()
    paths = target_paths(model)
    config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], target_modules=TARGETS, lora_dropout=0.0)
    per_round = replace(ctx.settings, steps=max(1, ctx.settings.steps // spec["rounds"]))  # same total steps
    deltas: list[dict[str, torch.Tensor]] = []
    rounds = []
    train_loss = float("nan")
    for t in range(spec["rounds"]):
        starts, hard_loss = hardest_windows(model, ctx.code_train, ctx.settings)
        torch.manual_seed(ctx.settings.init_seed + t)  # each round its own initialisation
        peft_model = get_peft_model(model, config)

        def hard_batches(gen: torch.Generator, starts=starts) -> tuple[torch.Tensor, torch.Tensor]:
            picks = torch.randint(len(starts), (ctx.settings.batch_size,), generator=gen).tolist()
            return windows(ctx.code_train, [starts[i] for i in picks])

        train_loss = fit(peft_model, hard_batches, per_round, f"{name} round {t + 1}", ctx.val)
        deltas.append({p: delta_weight(peft_model.base_model.model.get_submodule(p)) for p in paths})
        save_peft(peft_model, directory / f"round{t + 1}")
        model = peft_model.merge_and_unload()  # frozen from now on: the next round trains on top of it
        rounds.append(
            {
                "round": t + 1,
                "hard_windows": len(starts),
                "hard_windows_loss_before": hard_loss,
                "val_loss_code": ctx.val(model),
            }
        )
    manifest = {
        "format": "rankscope.composition/1",
        "mode": "sequential",
        "components": [f"round{t + 1}" for t in range(spec["rounds"])],
        "weights": [1.0] * spec["rounds"],
        "normalize": "none",
        "description": "BoostLoRA boosting rounds: each a rank-4 LoRA trained on the worst windows, merged",
    }
    (directory / "composition.json").write_text(json.dumps(manifest, indent=2) + "\n")

    reloaded = ctx.fresh_base()
    for t in range(spec["rounds"]):
        reloaded = PeftModel.from_pretrained(reloaded, directory / f"round{t + 1}").merge_and_unload()
    composite = {p: sum(d[p] for d in deltas) for p in paths}
    checks = {
        "peft_reload_max_abs_logit_diff": logits_error(model, reloaded, ctx.probe()),
        "rankscope_max_rel_sigma_error": spectrum_error(directory, composite),
        "growth_max_rel_sigma_error": growth_error(directory, deltas),
    }
    return {"model": model, "train_loss": train_loss, "checks": checks, "rounds": rounds}


def growth_error(directory: Path, deltas: list[dict[str, torch.Tensor]]) -> float:
    """rankscope's growth curve against the partial sums Σ_{i≤t} ΔW_i of the trained rounds (via σ_max, ‖·‖_F)."""
    worst = 0.0
    for record in rankscope.analyze(rankscope.load(directory)):
        for point in record.composition["growth"]:
            partial = sum(d[record.name] for d in deltas[: point["components"]])
            sigma = torch.linalg.svdvals(partial)
            for key, value in (("sigma_max", sigma[0].item()), ("frobenius", sigma.norm().item())):
                worst = max(worst, abs(point["metrics"][key] - value) / value)
    return worst


SPECS = {
    "lora-r8": {"kind": "peft", "r": 8, "alpha": 16},
    "lora-r32": {"kind": "peft", "r": 32, "alpha": 64},
    # control for BoRA: its Σ starts at e·I, so BoRA starts as LoRA at e times the scale; this is that LoRA
    "lora-r8-alpha16e": {"kind": "peft", "r": 8, "alpha": 16 * math.e},
    "dora-r8": {"kind": "peft", "r": 8, "alpha": 16, "use_dora": True},
    "bora-r8-b8": {"kind": "bora", "r": 8, "alpha": 16, "blocks": 8},
    "bora-r8-b4": {"kind": "bora", "r": 8, "alpha": 16, "blocks": 4},
    "melora-8x1": {"kind": "melora", "r": 1, "alpha": 2, "minis": 8},
    "hydralora-r8-h3": {"kind": "hydralora", "r": 8, "alpha": 16, "heads": 3},
    "boostlora-sum-k2": {"kind": "boostlora_sum", "r": 4, "alpha": 8, "components": 2},
    "boostlora-sum-k3": {"kind": "boostlora_sum", "r": 4, "alpha": 8, "components": 3},
    "boostlora-seq-k3": {"kind": "boostlora_seq", "r": 4, "alpha": 8, "rounds": 3},
}
TRAINERS = {"peft": train_peft, "boostlora_seq": train_rounds}


def trainable_params(model: nn.Module, spec: dict) -> int:
    if spec["kind"] == "boostlora_seq":  # merged rounds leave no parameters behind: count the saved ones
        per_rank = sum(m.in_features + m.out_features for m in (model.get_submodule(p) for p in target_paths(model)))
        return spec["rounds"] * spec["r"] * per_rank
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def passed(checks: dict) -> bool:
    limits = {
        "peft_reload_max_abs_logit_diff": LOGIT_TOLERANCE,
        "rankscope_max_rel_sigma_error": SPECTRUM_TOLERANCE,
        "growth_max_rel_sigma_error": SPECTRUM_TOLERANCE,
        "max_weight_error": 1e-9,
    }
    return all(value <= limits[key] for key, value in checks.items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "checkpoints")
    ap.add_argument("--base", type=Path, default=HERE / "checkpoints" / "tiny-base", help="tiny-base directory")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK.steps} steps of everything (smoke test)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (tiny matrices: 1 is fastest; 2 gives the same bits)"
    )
    ap.add_argument("--seed", type=int, default=SEED, help="batch order seed; adapters are initialised from seed+1")
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(SPECS)}")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(SPECS)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        ap.error(f"unknown adapter(s) {', '.join(unknown)}; choose from {', '.join(SPECS)}")

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    settings = replace(QUICK if args.quick else FULL, seed=args.seed)
    code_train, code_val = split(code_corpus()[0])
    ctx = Context(settings, args.base, args.out, code_train, code_val, split(prose_corpus())[1])
    base_val = ctx.val(ctx.fresh_base())
    print(f"base {args.base}: code val loss {base_val:.4f}; training {len(names)} adapters, {settings}")

    results = {}
    for name in names:
        spec = SPECS[name]
        shutil.rmtree(args.out / "adapters" / name, ignore_errors=True)
        t0 = time.perf_counter()
        outcome = TRAINERS.get(spec["kind"], train_custom)(ctx, name, spec)
        seconds = time.perf_counter() - t0
        model = outcome["model"]
        results[name] = {
            "family": spec["kind"],
            "settings": {k: v for k, v in spec.items() if k != "kind"},
            "path": f"adapters/{name}",
            "trainable_params": trainable_params(model, spec),
            "val_loss_code": ctx.val(model),
            "val_loss_prose": evaluate(model, ctx.prose_val, settings.n_eval),
            "final_train_loss": outcome["train_loss"],
            "seed": settings.init_seed,
            "batch_seed": settings.seed,
            "steps": settings.steps
            if "rounds" not in spec
            else max(1, settings.steps // spec["rounds"]) * spec["rounds"],
            "seconds": round(seconds, 2),
            "checks": outcome["checks"],
            "passed": passed(outcome["checks"]),
            **({"rounds": outcome["rounds"]} if "rounds" in outcome else {}),
        }
        r = results[name]
        print(
            f"{name}: {r['trainable_params']} params, code val {r['val_loss_code']:.4f}, {seconds:.1f} s, "
            f"checks {r['checks']} {'ok' if r['passed'] else 'FAILED'}"
        )

    summary = {
        "seed": settings.seed,
        "quick": args.quick,
        "base": os.path.relpath(args.base, args.out),  # relative: the file is committed
        "config": CONFIG,
        "targets": TARGETS,
        "training": {
            "steps": settings.steps,
            "batch_size": settings.batch_size,
            "lr": LR,
            "optimizer": "AdamW",
            "schedule": "20-step warm-up, linear decay",
            "n_eval_windows": settings.n_eval,
            "boosting_pool": settings.pool,
            "boosting_hard_fraction": settings.hard_fraction,
        },
        "val_loss_code_base": base_val,
        "adapters": results,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "peft": peft.__version__},
    }
    (args.out / "adapters.json").write_text(json.dumps(summary, indent=2) + "\n")
    failed = [name for name, r in results.items() if not r["passed"]]
    if failed:
        print(f"ERROR: checks failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    if not args.quick and not all(r["val_loss_code"] < base_val for r in results.values()):
        print("ERROR: an adapter did not reduce the code validation loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
