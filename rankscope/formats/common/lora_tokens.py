"""LoRA's ``trainable_token_indices`` (PEFT): rows of an embedding trained in full beside the LoRA factors.

PEFT wraps the embedding in a TrainableTokens layer and saves ``<module>.token_adapter.trainable_tokens_delta``
(k, d): despite its name, the new values of the k rows ``trainable_token_indices`` names (a list: the input
embedding; a dict: module name → indices). Its merge writes them in with ``index_copy``, so against the base
embedding W₀ (V, d)

    ΔW = E_idx·(W_saved − W₀[idx])     (V, d), nonzero only on those rows,

needs ``--base``, and on the analysed (d, V) matrix of an embedding is the exact product
(W_saved − W₀[idx])ᵀ·E_idxᵀ with E_idx the one-hot (V, k) selection: factored, rank ≤ k.
"""

from __future__ import annotations

import re

import torch

from ...core.base import BaseWeights
from ...core.checkpoint import Layer
from ...core.naming import layer_name
from ...core.update import FactoredUpdate, upcast
from .reader import Module, invalid_layer, nonfinite_among

FAMILY = "trainable-tokens"
# saved files strip the adapter name; a whole model's state dict keeps it (``….trainable_tokens_delta.default``)
TOKEN_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta(?:\.(?P<adapter>[^.]+))?$")
_BASE_HINT = "pass --base BASE (the base model the adapter was trained on)"


def split(keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """{stored module: key} of the token rows in ``keys``, and the other keys."""
    tokens, rest = {}, []
    for key in keys:
        match = TOKEN_KEY.match(key)
        if match is not None and match["adapter"] is None:
            tokens[match["module"]] = key
        else:
            rest.append(key)
    return tokens, rest


def _indices(rule: object, name: str) -> list[int] | None:
    """The token indices ``trainable_token_indices`` gives module ``name`` (a list: every token module)."""
    if isinstance(rule, dict):
        for target, indices in rule.items():
            if name == target or name.endswith(f".{target}"):
                return list(indices)
        return None
    return list(rule) if isinstance(rule, list | tuple) else None


def token_layer(stored: str, key: str, delta: torch.Tensor, rule: object, base: BaseWeights | None) -> Layer:
    """The embedding layer whose rows ``key`` replaces (an invalid layer, saying why, where it cannot be read)."""
    name = layer_name(stored)
    params = delta.numel()
    problem = nonfinite_among([(key, delta)])
    if problem:
        return invalid_layer(name, problem, params)
    indices = _indices(rule, name)
    if indices is None:
        return invalid_layer(name, f"{key}: trainable_token_indices in the config names no indices for {name}", params)
    if delta.ndim != 2 or delta.shape[0] != len(indices) or len(set(indices)) != len(indices):
        return invalid_layer(
            name, f"{key}: shape {list(delta.shape)} does not fit the {len(indices)} distinct token indices", params
        )
    if base is None:
        why = "trainable tokens replace rows of the embedding (ΔW = W_saved − W0 on those rows)"
        return invalid_layer(name, f"{key}: {why}; {_BASE_HINT}", params)
    if base.key_for(name) is None:
        return invalid_layer(name, f"{key}: --base ({base.path}) has no {name}.weight", params)
    vocabulary, width = (int(d) for d in base.shape(name))
    if width != delta.shape[1] or max(indices) >= vocabulary or min(indices) < 0:
        return invalid_layer(
            name, f"{key}: rows {list(delta.shape)} at indices up to {max(indices)} do not fit the base embedding "
            f"[{vocabulary}, {width}]", params,
        )  # fmt: skip
    index = torch.tensor(indices)
    rows = upcast(delta) - upcast(base.get(name)[index])
    selection = torch.zeros(len(indices), vocabulary, dtype=torch.float64)
    selection[torch.arange(len(indices)), index] = 1.0
    update = FactoredUpdate(rows.T.contiguous(), selection)
    return Layer(name, update, (vocabulary, width), params, kind="embedding", family=FAMILY)


def token_modules(
    tokens: dict[str, str], tensors, rule: object, base: BaseWeights | None
) -> list[tuple[Module, Layer]]:
    """(module, layer) of every token-rows tensor, as :func:`..lora.parse` lists its modules."""
    return [
        (Module(stored, {"tokens": key}), token_layer(stored, key, tensors.get(key), rule, base))
        for stored, key in tokens.items()
    ]
