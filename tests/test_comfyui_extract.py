"""Files of ComfyUI's "Extract and Save Lora" node (``LoraSave``, comfy_extras/nodes_lora_extract.py), whose
``bias_diff`` input is on by default.

ComfyUI is not a Python package this project can install, so the file is written here in the node's layout with
``safetensors.torch.save_file`` (what ``comfy.utils.save_torch_file`` calls), following its ``calc_lora_model`` for
``lora_type="standard"``, ``bias_diff=True``, on the difference of two state dicts (``ModelSubtract``):

- a ``.weight`` of ≥ 2 dims → ``diffusion_model.<module>.lora_up.weight`` (out, r[, 1, 1]) and ``.lora_down.weight``
  (r, in[, kh, kw]) from ``extract_lora`` (a truncated SVD, U·diag(S) and Vh clamped at their 0.99 quantile), fp16;
- a 1-D ``.weight`` (a norm layer's) → ``diffusion_model.<module>.diff``, fp16;
- a ``.bias`` → ``diffusion_model.<module>.diff_b``, fp16; no ``.alpha`` tensors.

ComfyUI's loader (comfy/lora.py ``load_lora``) applies up·down with alpha/r (1 without an alpha) and adds
``diff``/``diff_b`` to the weight and bias as they are (``("diff", (tensor,))`` patches, never times alpha/r). The
reference ΔW is (alpha/r)·up·down in float64 from the stored tensors; its σ from ``torch.linalg.svdvals``.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import rankscope
from rankscope.cli import main

RANK = 4
TOL = 1e-10
NORMS = ["diffusion_model.blocks.0.norm", "diffusion_model.blocks.1.norm"]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 12)
        self.conv = nn.Conv2d(4, 6, 3)
        self.shortcut = nn.Conv2d(6, 6, 1, bias=False)


def _extract(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ``extract_lora``: the rank-r truncated SVD of ΔW as (U·diag(S), Vh), clamped at the 0.99 quantile
    of their entries; for a conv, up is (out, r, 1, 1) and down (r, in, kh, kw)."""
    shape = diff.shape
    matrix = diff.flatten(start_dim=1) if diff.ndim == 4 else diff
    rank = min(rank, shape[0], shape[1])
    u, s, vh = torch.linalg.svd(matrix.float())
    up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    limit = torch.quantile(torch.cat([up.flatten(), down.flatten()]), 0.99)
    up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    if diff.ndim == 4:
        up, down = up.reshape(shape[0], rank, 1, 1), down.reshape(rank, shape[1], *shape[2:])
    return up, down


def comfy_lora_save(diff: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """``calc_lora_model(..., lora_type=STANDARD, bias_diff=True)`` on a state-dict difference."""
    out = {}
    for key, tensor in diff.items():
        name = "diffusion_model." + key.rpartition(".")[0]
        if key.endswith(".weight") and tensor.ndim < 2:
            out[f"{name}.diff"] = tensor.contiguous().half()
        elif key.endswith(".weight"):
            up, down = _extract(tensor, rank)
            out[f"{name}.lora_up.weight"] = up.contiguous().half()
            out[f"{name}.lora_down.weight"] = down.contiguous().half()
        elif key.endswith(".bias"):
            out[f"{name}.diff_b"] = tensor.contiguous().half()
    return out


@pytest.fixture(scope="module")
def extracted() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = nn.ModuleDict({"blocks": nn.ModuleList([Block(), Block()])})
    tuned = {key: value + 0.1 * torch.randn_like(value) for key, value in base.state_dict().items()}
    diff = {key: tuned[key] - value for key, value in base.state_dict().items()}  # ComfyUI's ModelSubtract
    return comfy_lora_save(diff, RANK)


MODULES = [f"diffusion_model.blocks.{i}.{m}" for i in range(2) for m in ("qkv", "conv", "shortcut")]


def _reference(tensors: dict[str, torch.Tensor], module: str, scale: float) -> torch.Tensor:
    up = tensors[f"{module}.lora_up.weight"].double()
    down = tensors[f"{module}.lora_down.weight"].double()
    return scale * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def _check(records: dict, tensors: dict[str, torch.Tensor], scale: float) -> None:
    assert set(records) == set(MODULES)
    for module, record in records.items():
        assert record.valid, record.error
        expected = torch.linalg.svdvals(_reference(tensors, module, scale))
        got = torch.tensor(record.singular_values, dtype=torch.float64)
        assert record.rank_bound == RANK and expected[RANK - 1] > 1e-3 * expected[0]
        rel = ((got[:RANK] - expected[:RANK]).abs() / expected[:RANK]).max().item()
        assert rel <= TOL, f"{module}: relative error {rel:.2e}"
        bias = tensors.get(f"{module}.diff_b")
        if bias is None:
            assert record.bias_update is None
        else:  # ComfyUI adds diff_b to the bias as stored, whatever alpha/r is
            assert record.bias_update["size"] == bias.numel()
            assert record.bias_update["norm"] == pytest.approx(float(bias.double().norm()), rel=1e-15)


def test_lora_save_with_bias_diff(extracted, tmp_path):
    path = tmp_path / "ComfyUI_extracted_lora_00001_.safetensors"
    save_file(extracted, str(path))
    checkpoint = rankscope.load(path)
    assert checkpoint.family == "kohya"
    records = {record.name: record for record in rankscope.analyze(checkpoint)}
    _check(records, extracted, 1.0)
    assert records["diffusion_model.blocks.0.conv"].shape == [6, 4, 3, 3]
    assert records["diffusion_model.blocks.0.conv"].kind == "conv2d"
    # the norm layers' weight and bias differences are vector updates: named as not analysed, not invalid layers
    missing = {item.module: item for item in checkpoint.not_analysed}
    assert sorted(missing) == NORMS
    assert set(missing[NORMS[0]].keys) == {f"{NORMS[0]}.diff", f"{NORMS[0]}.diff_b"}
    assert "a vector (norm) weight difference" in missing[NORMS[0]].reason

    out = tmp_path / "spectrum.json"
    result = CliRunner().invoke(main, ["spectrum", str(path), "--json", str(out), "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    assert [item["module"] for item in document["not_analysed"]] == NORMS
    assert len(document["layers"]) == len(MODULES) and all(layer["valid"] for layer in document["layers"])


def test_bias_diff_is_not_scaled_by_alpha(extracted, tmp_path):
    """With an ``.alpha`` beside the factors (kohya-style), up·down is scaled by alpha/r and diff_b is not —
    also under --unscaled, where only the factors' product loses its scale."""
    tensors = dict(extracted)
    tensors.update({f"{module}.alpha": torch.tensor(2.0) for module in MODULES})
    path = tmp_path / "with-alpha.safetensors"
    save_file(tensors, str(path))
    checkpoint = rankscope.load(path)
    _check({r.name: r for r in rankscope.analyze(checkpoint)}, tensors, 2.0 / RANK)
    _check({r.name: r for r in rankscope.analyze(checkpoint, unscaled=True)}, tensors, 1.0)


def test_a_bias_difference_that_does_not_fit(extracted, tmp_path):
    """A diff_b of the wrong length makes its layer invalid (naming the key); one without any weight update is a
    vector update, listed as not analysed."""
    tensors = dict(extracted)
    tensors["diffusion_model.blocks.0.qkv.diff_b"] = torch.randn(5).half()
    tensors["diffusion_model.head.diff_b"] = torch.randn(3).half()
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    checkpoint = rankscope.load(path)
    layers = {layer.name: layer for layer in checkpoint.layers}
    assert layers["diffusion_model.blocks.0.qkv"].error == (
        "diffusion_model.blocks.0.qkv.diff_b: expected shape [12] (one per output), found [5]"
    )
    assert layers["diffusion_model.blocks.1.qkv"].error is None
    missing = {item.module: item.reason for item in checkpoint.not_analysed}
    assert missing["diffusion_model.head"].startswith("a bias difference (diff_b) without a weight update")


def test_full_diff_files_are_detected_and_read_exactly(tmp_path):
    """``lora_type="full_diff"``: every weight of ≥ 2 dims is stored whole as ``<module>.diff`` (its ``diff_b``
    beside it), 1-D ones as ``.diff`` too; ComfyUI adds them to the model as they are."""
    torch.manual_seed(3)
    qkv, conv = torch.randn(12, 8, dtype=torch.float64), torch.randn(6, 4, 3, 3, dtype=torch.float64)
    tensors = {
        "diffusion_model.blocks.0.qkv.diff": qkv,
        "diffusion_model.blocks.0.qkv.diff_b": torch.randn(12, dtype=torch.float64),
        "diffusion_model.blocks.0.conv.diff": conv,
        "diffusion_model.blocks.0.norm.diff": torch.randn(8, dtype=torch.float64),
    }
    path = tmp_path / "full_diff.safetensors"
    save_file(tensors, str(path))
    analysis = rankscope.analyze(rankscope.load(path))
    records = {record.name: record for record in analysis}
    assert set(records) == {"diffusion_model.blocks.0.qkv", "diffusion_model.blocks.0.conv"}
    for name, weight in (("diffusion_model.blocks.0.qkv", qkv), ("diffusion_model.blocks.0.conv", conv)):
        expected = torch.linalg.svdvals(weight.reshape(weight.shape[0], -1))
        got = torch.tensor(records[name].singular_values, dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=TOL, atol=TOL * float(expected[0]))
    assert [item.module for item in analysis.checkpoint.not_analysed] == ["diffusion_model.blocks.0.norm"]
