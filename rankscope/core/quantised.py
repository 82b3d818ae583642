"""Quantised base weights read back as floats: bitsandbytes 4-bit (NF4/FP4, double quantisation) and 8-bit.

QLoRA trains on a base stored by bitsandbytes; ``save_pretrained`` writes each quantised linear weight as

- **4-bit** (``Params4bit``): ``<key>`` the packed codes (two 4-bit indices a byte, high nibble first, over the
  flattened weight; any storage dtype, read as bytes), ``<key>.absmax`` one scale a block of ``blocksize``
  consecutive elements, ``<key>.quant_map`` the 16-entry code table, and ``<key>.quant_state.bitsandbytes__<type>``
  a JSON object (UTF-8 bytes) with ``quant_type``, ``blocksize``, ``dtype`` and ``shape``. With double quantisation
  the absmax is itself 8-bit: ``absmax`` holds indices into ``<key>.nested_quant_map`` (256 entries), scaled by
  ``<key>.nested_absmax`` per ``nested_blocksize`` entries, plus ``nested_offset`` (in the JSON).
  W₀[i] = code[q_i] · absmax[⌊i / blocksize⌋], absmax_j = nested_map[a_j] · nested_absmax[⌊j / nested_blocksize⌋]
  + offset.
- **8-bit** (``Int8Params``, LLM.int8()): ``<module>.weight`` int8 (out × in), ``<module>.SCB`` one scale a row and
  ``<module>.weight_format`` (0: row-major, the only layout saved since bitsandbytes 0.45).
  W₀[r, c] = q[r, c] · SCB[r] · (1/127).

Each product is formed in float64, where a product of two float32 values is exact, and rounded to float32 once, as
bitsandbytes' kernels round their float32 products (then to the stored ``dtype``, as ``dequantize_4bit`` returns
it): the result is bitsandbytes' own, bit for bit (up to the sign of zero). No bitsandbytes import: the tables are
written out here. GPTQ and AWQ (``qweight``/``qzeros``/``scales``, GPTQ's ``g_idx``) pack differently per kernel
and version (exllama, marlin, GEMM/GEMV layouts), with no writer testable offline here: they are refused, by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from .errors import CheckpointError

# bitsandbytes' get_4bit_type("nf4"): quantiles of N(0, 1) (QLoRA, Dettmers et al. 2023), as float32 values
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bits in bit-pattern order, divided by 12 in float32
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
INT8_SCALE = 7.874015718698502e-3  # bitsandbytes' 1/127, a float32 factor of its int8_vectorwise_dequant
_CHUNK = 1 << 22  # elements dequantised at a time (float64 temporaries stay ~32 MiB)
BNB4 = "bitsandbytes 4-bit"
BNB8 = "bitsandbytes 8-bit"


def code_table(quant_type: str) -> torch.Tensor:
    """The 16 float32 code values of ``nf4`` or ``fp4``, as bitsandbytes builds them."""
    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    raise ValueError(quant_type)


def _f32(values: torch.Tensor) -> torch.Tensor:
    """Round float64 values to float32 and back: one float32 operation's result (53 ≥ 2·24 + 2 bits, so rounding
    an exact or float64-rounded result to float32 is the correctly rounded float32 operation)."""
    return values.to(torch.float32).to(torch.float64)


def dequantise_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    state: dict,
    quant_map: torch.Tensor | None = None,
    nested: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """W₀ from bitsandbytes 4-bit storage: ``state`` the quant_state JSON, ``nested`` (nested_absmax,
    nested_quant_map) under double quantisation; returned in ``state['dtype']``, as ``dequantize_4bit`` returns it."""
    shape, blocksize = [int(s) for s in state["shape"]], int(state["blocksize"])
    code = (quant_map if quant_map is not None else code_table(state["quant_type"])).to(torch.float64)
    scales = absmax.reshape(-1)
    if nested is not None:
        nested_absmax, nested_map = nested
        nested_dtype = getattr(torch, state.get("nested_dtype", "float32"))
        index = torch.arange(scales.numel()) // int(state["nested_blocksize"])
        product = _f32(nested_map.to(torch.float64)[scales.long()] * nested_absmax.reshape(-1).double()[index])
        offset = float(torch.tensor(float(state["nested_offset"]), dtype=torch.float32))
        scales = (product.to(nested_dtype).double() + offset).to(nested_dtype)  # absmax += offset, in its dtype
    scales = scales.to(torch.float32).to(torch.float64)  # the kernel's float32 absmax
    count = 1
    for size in shape:
        count *= size
    data = packed.reshape(-1).contiguous().view(torch.uint8)
    out = torch.empty(count, dtype=torch.float32)
    step = _CHUNK - _CHUNK % (2 * blocksize)  # whole blocks and whole bytes per chunk
    for start in range(0, count, step):
        stop = min(start + step, count)
        chunk = data[start // 2 : (stop + 1) // 2].long()
        index = torch.stack((chunk >> 4, chunk & 0xF), dim=1).reshape(-1)[: stop - start]
        values, blocks = code[index], -(-(stop - start) // blocksize)
        values = torch.nn.functional.pad(values, (0, blocks * blocksize - (stop - start)))  # a partial last block
        first = start // blocksize
        scaled = values.view(blocks, blocksize) * scales[first : first + blocks, None]
        out[start:stop] = scaled.reshape(-1)[: stop - start].to(torch.float32)
    return out.reshape(shape).to(getattr(torch, state["dtype"]))


def dequantise_int8(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """W₀ = q · SCB[row] · (1/127) from LLM.int8() storage, float32 as ``int8_vectorwise_dequant`` returns it."""
    factor = float(torch.tensor(INT8_SCALE, dtype=torch.float32))
    rows = _f32(weight.to(torch.float64) * scb.to(torch.float32).double().reshape(-1, *[1] * (weight.ndim - 1)))
    return (rows * factor).to(torch.float32)


# -- finding the stored parts of one weight ----------------------------------------------------------------


def _quant_state_key(key: str, keys: set[str] | dict) -> str | None:
    found = [f"{key}.quant_state.bitsandbytes__{t}" for t in ("nf4", "fp4")]
    present = [k for k in found if k in keys]
    return present[0] if present else None


def stored_format(key: str, keys: set[str] | dict) -> str | None:
    """Which quantised format stores weight ``key`` among ``keys`` (``BNB4``/``BNB8``), or None for a plain one."""
    if f"{key}.absmax" in keys or _quant_state_key(key, keys) is not None:
        return BNB4
    module, dot, suffix = key.rpartition(".")
    if dot and suffix == "weight" and f"{module}.SCB" in keys:
        return BNB8
    return None


def unsupported_format(module: str, keys: set[str] | dict, config: dict | None = None) -> str | None:
    """The name of a quantised format that stores ``module``'s weight and is not read (GPTQ, AWQ), with the
    tensors of it the file holds, or None."""
    if f"{module}.qweight" not in keys:
        return None
    method = str(((config or {}).get("quantization_config") or {}).get("quant_method") or "").lower()
    present = ", ".join(part for part in ("qweight", "qzeros", "scales", "g_idx") if f"{module}.{part}" in keys)
    if method == "awq" or (not method and f"{module}.g_idx" not in keys):
        return f"{'AWQ' if method == 'awq' else 'GPTQ/AWQ'} ({present})"
    return f"{method.upper() if method else 'GPTQ'} ({present})"


def refusal(fmt: str, path: object, key: str) -> CheckpointError:
    """The one-line error for a base stored in a quantised format that is not read."""
    return CheckpointError(
        f"base (the base model) is quantised ({fmt}), a format rankscope does not dequantise (it reads "
        "bitsandbytes 4-bit and 8-bit): give the unquantised model",
        path=path,
        key=key,
        argument="base",
    )


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_BLOCKSIZE = _CHUNK // 2  # a chunk holds whole blocks (bitsandbytes itself writes 32 … 4096)


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def state_of(key: str, keys: set[str] | dict, get: Callable[[str], torch.Tensor], path: object) -> dict:
    """The 4-bit quant_state JSON of weight ``key`` (``get`` reads a stored tensor), its fields checked: what the
    dequantisation reads is there and of a usable type, so bad metadata is a one-line error naming the tensor."""
    state_key = _quant_state_key(key, keys)
    absent = [k for k in (f"{key}.absmax", state_key) if k is None or k not in keys]
    if absent:
        what = absent[0] or f"{key}.quant_state.bitsandbytes__<nf4|fp4>"
        raise CheckpointError(f"{BNB4} weight without its absmax or quant_state (missing: {what})", path=path, key=key)
    assert state_key is not None
    try:
        state = json.loads(bytes(get(state_key).to(torch.uint8).numpy()).decode("utf-8"))
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"unreadable bitsandbytes quant_state ({error})", path=path, key=state_key) from None

    def bad(field: str, expected: str) -> CheckpointError:
        got = f"{field} {state[field]!r}" if field in state else f"no {field}"
        return CheckpointError(f"bitsandbytes quant_state: {got} (expected {expected})", path=path, key=state_key)

    if not isinstance(state, dict):
        raise CheckpointError(f"bitsandbytes quant_state is a JSON {type(state).__name__}, not an object", path=path,
                              key=state_key)  # fmt: skip
    dtypes = f"one of {', '.join(_DTYPES)}"
    if state.get("quant_type") not in ("nf4", "fp4"):
        raise bad("quant_type", "'nf4' or 'fp4'")
    shape = state.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise bad("shape", "a list of non-negative integers")
    if not _positive_int(state.get("blocksize")) or state["blocksize"] > _MAX_BLOCKSIZE:
        raise bad("blocksize", f"an integer from 1 to {_MAX_BLOCKSIZE}")
    if state.get("dtype") not in _DTYPES:
        raise bad("dtype", dtypes)
    if "nested_offset" in state:  # double quantisation: the absmax is itself 8-bit
        if isinstance(state["nested_offset"], bool) or not isinstance(state["nested_offset"], (int, float)):
            raise bad("nested_offset", "a number")
        if not _positive_int(state.get("nested_blocksize")):
            raise bad("nested_blocksize", "a positive integer")
        if state.get("nested_dtype", "float32") not in _DTYPES:
            raise bad("nested_dtype", dtypes)
        for part in ("nested_absmax", "nested_quant_map"):
            if f"{key}.{part}" not in keys:
                raise CheckpointError(
                    f"{BNB4} weight with double quantisation (nested_offset) but no {part}", path=path, key=key
                )
    return state


def dequantise_stored(
    key: str, keys: set[str] | dict, get: Callable[[str], torch.Tensor], path: object
) -> torch.Tensor:
    """Weight ``key`` dequantised from its stored parts (``stored_format(key, keys)`` must name one)."""
    fmt = stored_format(key, keys)
    if fmt == BNB8:
        module = key.rpartition(".")[0]
        if f"{module}.weight_format" in keys:
            code = get(f"{module}.weight_format")
            if code.numel() != 1:  # bitsandbytes saves one format code (and reads it with .item())
                raise CheckpointError(
                    f"{BNB8} weight_format with {code.numel()} values (expected one format code)",
                    path=path,
                    key=f"{module}.weight_format",
                )
            if int(code.reshape(-1)[0]) != 0:
                raise CheckpointError(f"{BNB8} weight in a tiled GPU layout (weight_format ≠ row)", path=path, key=key)
        weight, scb = get(key), get(f"{module}.SCB")
        fits = weight.dtype == torch.int8 and weight.ndim == 2 and scb.numel() == weight.shape[0]
        if not (fits and scb.is_floating_point()):
            raise CheckpointError(
                f"{BNB8}: expected an int8 matrix and one float SCB scale a row, got {weight.dtype} "
                f"{list(weight.shape)} and {scb.numel()} {scb.dtype} scales",
                path=path,
                key=key,
            )
        return dequantise_int8(weight, scb)
    state = state_of(key, keys, get, path)
    quant_map = get(f"{key}.quant_map") if f"{key}.quant_map" in keys else None
    if quant_map is not None and not torch.equal(quant_map.to(torch.float32), code_table(state["quant_type"])):
        # bitsandbytes' kernels use their built-in table whatever the file says: a different map is ambiguous
        raise CheckpointError(f"quant_map is not bitsandbytes' {state['quant_type']} table", path=path, key=key)
    packed, absmax = get(key), get(f"{key}.absmax")
    count = 1
    for size in state["shape"]:
        count *= size
    blocks = -(-count // state["blocksize"])
    if packed.numel() * packed.element_size() < (count + 1) // 2 or absmax.numel() != blocks:
        raise CheckpointError(
            f"{BNB4}: {packed.numel() * packed.element_size()} bytes and {absmax.numel()} absmax values do not fit "
            f"shape {state['shape']} with blocksize {state['blocksize']}",
            path=path,
            key=key,
        )
    nested = None
    if "nested_offset" in state:
        nested = (get(f"{key}.nested_absmax"), get(f"{key}.nested_quant_map"))
        _check_nested(key, absmax, nested, state["nested_blocksize"], path)
    elif not absmax.is_floating_point():
        raise CheckpointError(
            f"{BNB4}: {absmax.dtype} absmax without double quantisation (no nested_offset in the quant_state)",
            path=path,
            key=f"{key}.absmax",
        )
    return dequantise_4bit(packed, absmax, state, quant_map, nested)


def _check_nested(
    key: str, absmax: torch.Tensor, nested: tuple[torch.Tensor, torch.Tensor], blocksize: int, path: object
) -> None:
    """Double quantisation's parts fit: uint8 absmax indices, a 256-entry map, one nested scale a block."""
    nested_absmax, nested_map = nested
    if absmax.dtype != torch.uint8:
        raise CheckpointError(
            f"{BNB4}: double quantisation needs uint8 absmax indices, got {absmax.dtype}",
            path=path,
            key=f"{key}.absmax",
        )
    if nested_map.numel() != 256 or not nested_map.is_floating_point():
        raise CheckpointError(
            f"{BNB4}: nested_quant_map has {nested_map.numel()} {nested_map.dtype} values (expected 256 floats)",
            path=path,
            key=f"{key}.nested_quant_map",
        )
    expected = -(-absmax.numel() // blocksize)
    if nested_absmax.numel() != expected or not nested_absmax.is_floating_point():
        raise CheckpointError(
            f"{BNB4}: {nested_absmax.numel()} {nested_absmax.dtype} nested_absmax values where {absmax.numel()} absmax "
            f"values in blocks of nested_blocksize {blocksize} need {expected}",
            path=path,
            key=f"{key}.nested_absmax",
        )


def describe(key: str, keys: set[str] | dict, get: Callable[[str], torch.Tensor], path: object) -> str:
    """A short name of how weight ``key`` is stored: ``bitsandbytes 4-bit nf4 (double quantisation)``, …"""
    if stored_format(key, keys) == BNB8:
        return f"{BNB8} (LLM.int8)"
    state = state_of(key, keys, get, path)
    nested = " with double quantisation" if "nested_offset" in state else ""
    return f"{BNB4} {state['quant_type']}{nested}"


__all__ = [
    "BNB4",
    "BNB8",
    "NF4",
    "code_table",
    "dequantise_4bit",
    "dequantise_int8",
    "dequantise_stored",
    "describe",
    "refusal",
    "state_of",
    "stored_format",
    "unsupported_format",
]
