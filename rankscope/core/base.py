"""The base model's weights (``--base``), read lazily: only the tensors an update needs (DoRA, IA3).

``--base`` is a Hugging Face model directory (``model.safetensors``, or shards listed in
``model.safetensors.index.json``, or ``pytorch_model.bin``), a diffusers component directory
(``diffusion_pytorch_model.safetensors``, sharded or not), a diffusers pipeline directory (its ``unet/``,
``transformer/``, ``text_encoder/``, ``text_encoder_2/``… subfolders), or one tensor file.

A layer ``model.layers.0.self_attn.q_proj`` finds its weight under ``model.layers.0.self_attn.q_proj.weight``
(docs/architecture.md, "Names of layers"). Image-generation adapters name layers in two more ways, both resolved here:

- with a component prefix (``unet.down_blocks.0…``, ``text_encoder_2.…``, ComfyUI's ``diffusion_model.…``): a
  pipeline directory picks that component's folder; a component directory or file serves the name without the
  prefix (a directory named after a component serves only that component);
- kohya/LyCORIS's flattened names (``lora_unet_down_blocks_0_attentions_0_proj_in``, ``lora_te1_…``,
  ``lycoris_0``): ``prefix + module.replace(".", "_")`` of the base's own module names, the prefix choosing the
  component (``lora_te_``/``lora_te1_`` text_encoder, ``lora_te2_`` text_encoder_2, ``lora_unet_`` unet or
  transformer); a flattened name that two base modules share is ambiguous and found nowhere.

A base quantised by bitsandbytes (QLoRA's 4-bit NF4/FP4, double quantisation included, and 8-bit) is read back
as floats, as bitsandbytes dequantises it (:mod:`.quantised`); ``dequantised`` says which weights were. GPTQ and
AWQ bases (``qweight``…) are refused in one line naming the format.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from . import quantised
from .errors import CheckpointError
from .naming import layer_name
from .saved_layouts import saved_names
from .tensorfile import TENSOR_SUFFIXES, TensorFile, read_json

_INDEX_NAMES = (
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "diffusion_pytorch_model.bin.index.json",
)
_SINGLE_NAMES = (
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
)
# the components of a diffusers pipeline that adapters train, in the order an unprefixed name is looked up
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_DENOISERS = ("unet", "transformer")
# kohya/LyCORIS prefixes → the components they may name (None: any)
_KOHYA = re.compile(r"^(lora_unet_|lora_transformer_|lora_te1_|lora_te2_|lora_te3_|lora_te_|lycoris_)")
_KOHYA_COMPONENTS: dict[str, tuple[str, ...] | None] = {
    "lora_unet_": _DENOISERS,
    "lora_transformer_": ("transformer",),
    "lora_te_": ("text_encoder",),
    "lora_te1_": ("text_encoder",),
    "lora_te2_": ("text_encoder_2",),
    "lora_te3_": ("text_encoder_3",),
    "lycoris_": None,
}
_COMFY_PREFIX = "diffusion_model"  # ComfyUI / musubi-tuner: the denoiser
# an original (LDM) single-file checkpoint's UNet and first text encoder, under which kohya's names flatten, and
# the kohya prefixes each serves (SDXL's second text encoder is OpenCLIP, laid out otherwise: not mapped)
_SINGLE_FILE_PREFIXES = {
    "model.diffusion_model.": ("lora_unet_",),
    "cond_stage_model.transformer.": ("lora_te_", "lora_te1_"),
    "conditioner.embedders.0.transformer.": ("lora_te_", "lora_te1_"),
}


class BaseWeights:
    """Base-model tensors by layer name, opened on first use."""

    def __init__(self, path: str | Path, *, files: dict[str, Path] | None = None) -> None:
        if files is None:  # a hub id ``owner/name[@revision]`` that is no local path: its cached snapshot
            from .hub import resolve_base

            path = resolve_base(path)
        self.path = Path(path)
        self._files: dict[Path, TensorFile] = {}
        # a pipeline directory: one BaseWeights per component folder, opened when a layer of it is asked for
        self._components: dict[str, BaseWeights | None] | None = None
        self._key_to_file: dict[str, Path] = {}
        if files is None and _is_pipeline(self.path):
            # a component folder with only its config.json (a text encoder left out of the download) holds nothing
            self._components = dict.fromkeys(c for c in COMPONENTS if _has_weights(self.path / c))
        else:
            self._key_to_file = files or self._index()
        # a folder named after a component (or a weights file in one) serves only that component's prefixed names
        folder = self.path if self.path.is_dir() else self.path.parent
        self.component = folder.name if folder.name in COMPONENTS and files is None else None
        self._by_name = _names(self._key_to_file)
        self._flat: dict[tuple[str | None, str], str | None] | None = None
        self.dequantised: dict[str, str] = {}  # stored key → how it was stored (bitsandbytes 4-bit nf4, …)

    @classmethod
    def from_tensor_file(cls, tensors: TensorFile) -> BaseWeights:
        """Base weights that live in the same file as the adapter (training checkpoints)."""
        base = cls(tensors.path, files=dict.fromkeys(tensors.keys(), tensors.path))
        base._files[tensors.path] = tensors
        return base

    def _index(self) -> dict[str, Path]:
        path = self.path
        if not path.exists():
            raise CheckpointError("base (the base model): no such file or directory", path=path, argument="base")
        if path.is_file():
            if path.suffix not in TENSOR_SUFFIXES:
                raise CheckpointError(
                    f"base (the base model): expected a directory or a {'/'.join(TENSOR_SUFFIXES)} file",
                    path=path,
                    argument="base",
                )
            return dict.fromkeys(self._open(path).keys(), path)
        for name in _INDEX_NAMES:
            if (path / name).is_file():
                return index_files(path / name, "base model index")
        for name in _SINGLE_NAMES:
            if (path / name).is_file():
                return dict.fromkeys(self._open(path / name).keys(), path / name)
        candidates = sorted(p for p in path.iterdir() if p.suffix in TENSOR_SUFFIXES)
        if len(candidates) == 1:
            return dict.fromkeys(self._open(candidates[0]).keys(), candidates[0])
        raise CheckpointError(
            f"base (the base model): no {' or '.join(_SINGLE_NAMES)} (or an index of shards) in this directory, and "
            f"no pipeline subfolders ({', '.join(COMPONENTS)})",
            path=path,
            argument="base",
        )

    def _open(self, path: Path) -> TensorFile:
        if path not in self._files:
            self._files[path] = TensorFile(path)
        return self._files[path]

    # -- finding a layer's tensor ------------------------------------------------------------------------

    def _component(self, name: str) -> BaseWeights:
        part = (self._components or {}).get(name)
        if part is None:
            part = BaseWeights(self.path / name)
            self._components[name] = part  # type: ignore[index]
        return part

    def _locate(self, layer: str, suffix: str) -> tuple[BaseWeights, str] | None:
        """The BaseWeights that holds ``layer``'s tensor and its stored key there, or None."""
        if self._components is None:
            key = self._own_key(layer, suffix)
            return (self, key) if key is not None else None
        names, inner = _components_of(layer, tuple(self._components))
        found = [(part, key) for part in map(self._component, names) if (key := part._own_key(inner, suffix))]
        return found[0] if len(found) == 1 else None

    def _own_key(self, layer: str, suffix: str) -> str | None:
        """``layer``'s key among this file's (or component's) own tensors: as named, in the layout transformers
        saves it in, without a component prefix this base serves, or by kohya's flattening."""
        key = self._direct(layer, suffix) or self._saved_layout(layer, suffix)
        if key is not None:
            return key
        component, dot, rest = layer.partition(".")
        if dot and self._serves(component):
            return self._direct(rest, suffix) or (
                self._direct(rest.removeprefix("text_model."), suffix) if rest.startswith("text_model.") else None
            )
        prefix = _KOHYA.match(layer)
        if prefix is not None and self._serves_kohya(prefix[1]):
            return self._flattened(layer[prefix.end() :], suffix, prefix[1])
        return None

    def _serves(self, component: str) -> bool:
        if component == _COMFY_PREFIX:
            return self.component in (None, *_DENOISERS)
        return component in COMPONENTS and self.component in (None, component)

    def _serves_kohya(self, prefix: str) -> bool:
        allowed = _KOHYA_COMPONENTS[prefix]
        return self.component is None or allowed is None or self.component in allowed

    def _direct(self, layer: str, suffix: str) -> str | None:
        wanted = f"{layer}.{suffix}"
        if wanted in self._by_name:
            return self._by_name[wanted]
        matches = [key for name, key in self._by_name.items() if name.endswith(f".{wanted}")]
        return matches[0] if len(matches) == 1 else None

    def _saved_layout(self, layer: str, suffix: str) -> str | None:
        """The key of ``layer.suffix`` (an adapter's name: the model's in memory) where transformers ≥ 5 saved it
        under its older checkpoint names (:mod:`.saved_layouts`)."""
        return next(
            (self._by_name[saved] for saved in saved_names(f"{layer}.{suffix}") if saved in self._by_name), None
        )

    def _flattened(self, rest: str, suffix: str, kohya: str) -> str | None:
        """kohya's rule: the base module whose dotted name, with "." → "_", is ``rest`` (transformers ≥ 5 dropped
        CLIP's ``text_model.`` level, older kohya files keep it: either matches); in an original single-file
        checkpoint (SD 1.x, SDXL) the name below the prefix of the part the ``kohya`` prefix names."""
        if self._flat is None:
            self._flat = {}
            for name, key in self._by_name.items():
                places = [(None, name)]  # every kohya prefix may name it as stored
                for outer, served in _SINGLE_FILE_PREFIXES.items():
                    if name.startswith(outer):
                        places += [(kind, name.removeprefix(outer)) for kind in served]
                for kind, dotted in places:
                    module, _, last = dotted.rpartition(".")
                    flat = (kind, f"{module.replace('.', '_')}.{last}")
                    self._flat[flat] = None if flat in self._flat and self._flat[flat] != key else key
        for candidate in (rest, rest.removeprefix("text_model_"), f"text_model_{rest}"):
            for kind in (None, kohya):
                key = self._flat.get((kind, f"{candidate}.{suffix}"))
                if key is not None:
                    return key
        return None

    def key_for(self, layer: str, suffix: str = "weight") -> str | None:
        """The stored key of ``layer``'s tensor (``<component>/<key>`` in a pipeline directory), or None.

        Keys are compared as layer names (PEFT's ``base_model.model.`` prefix, ``module.``/``_orig_mod.``
        segments and a ``.base_layer`` wrapper dropped), so a PEFT-wrapped state dict serves as a base too; a
        base whose names carry an extra leading part matches where exactly one name ends in ``.<layer>``;
        component prefixes and kohya/LyCORIS names as the module docstring says.
        """
        found = self._locate(layer, suffix)
        if found is None:
            return None
        part, key = found
        return key if part is self else f"{part.path.name}/{key}"

    def _require(self, layer: str, suffix: str) -> tuple[BaseWeights, str]:
        found = self._locate(layer, suffix)
        if found is None:
            packed = self._locate(layer, "qweight") if suffix == "weight" else None
            if packed is not None:  # GPTQ/AWQ: the weight is stored under other keys, in a format not read
                self.refuse_quantised(layer)
            raise CheckpointError(
                f"no tensor for layer {layer!r} in base (is it the model this adapter was trained on?)",
                path=self.path,
                key=f"{layer}.{suffix}",
                argument="base",
            )
        return found

    def refuse_quantised(self, layer: str) -> None:
        """Raise the one-line refusal where ``layer``'s weight is stored as GPTQ/AWQ (``qweight``…); else nothing."""
        found = self._locate(layer, "qweight")
        if found is None:
            return
        part, key = found
        module = key.rpartition(".")[0]
        config = part.path / "config.json" if part.path.is_dir() else part.path.parent / "config.json"
        fmt = quantised.unsupported_format(module, part._key_to_file, read_json(config) if config.is_file() else {})
        raise quantised.refusal(fmt or "GPTQ/AWQ (qweight, qzeros, scales)", part._key_to_file[key], key)

    def _stored(self, key: str) -> torch.Tensor:
        return self._open(self._key_to_file[key]).get(key)

    def shape(self, layer: str, suffix: str = "weight") -> tuple[int, ...]:
        """The shape of ``layer``'s base tensor, read from the header without loading it (a bitsandbytes 4-bit
        weight: the shape its quant_state records)."""
        part, key = self._require(layer, suffix)
        if quantised.stored_format(key, part._key_to_file) == quantised.BNB4:
            return tuple(quantised.state_of(key, part._key_to_file, part._stored, part._key_to_file[key])["shape"])
        return part._open(part._key_to_file[key]).shape(key)

    def get(self, layer: str, suffix: str = "weight") -> torch.Tensor:
        """``layer``'s base tensor (dequantised where bitsandbytes stored it); a one-line error names the base and
        the key looked for."""
        part, key = self._require(layer, suffix)
        if quantised.stored_format(key, part._key_to_file) is None:
            return part._stored(key)
        where = part._key_to_file[key]
        self.dequantised[key] = quantised.describe(key, part._key_to_file, part._stored, where)
        return quantised.dequantise_stored(key, part._key_to_file, part._stored, where)

    def location(self, layer: str, suffix: str = "weight") -> tuple[Path, str]:
        """The file that stores ``layer``'s base tensor and its key there (what a cache of it is keyed by)."""
        part, key = self._require(layer, suffix)
        return part._key_to_file[key], key


def index_files(index: Path, what: str = "model index") -> dict[str, Path]:
    """Stored key → shard file from a sharded model's index (``*.safetensors.index.json``: its ``weight_map``)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{what} has no 'weight_map' object", path=index)
    return {str(key): index.parent / str(file) for key, file in weight_map.items()}


def _is_pipeline(path: Path) -> bool:
    """A diffusers pipeline directory: ``model_index.json``, or component subfolders and no weights of its own."""
    if not path.is_dir():
        return False
    if (path / "model_index.json").is_file():
        return True
    return not _has_weights(path) and any((path / c).is_dir() for c in COMPONENTS)


def _has_weights(path: Path) -> bool:
    """A directory with weights of its own: an index of shards, one of the usual weight files, or a tensor file."""
    if not path.is_dir():
        return False
    return any((path / name).is_file() for name in (*_INDEX_NAMES, *_SINGLE_NAMES)) or any(
        p.suffix in TENSOR_SUFFIXES for p in path.iterdir()
    )


def _components_of(layer: str, present: tuple[str, ...]) -> tuple[list[str], str]:
    """The pipeline components that may hold ``layer``, and the name to look up in them.

    ``unet.x`` → unet and ``x``; ``diffusion_model.x`` → the denoiser; ``lora_te2_x`` → text_encoder_2 (the
    kohya name kept, flattened there); any other name is looked up in every component (found in exactly one).
    """
    component, dot, rest = layer.partition(".")
    if dot and component in present:
        return [component], rest
    if dot and component == _COMFY_PREFIX:
        return [c for c in _DENOISERS if c in present][:1], rest
    prefix = _KOHYA.match(layer)
    allowed = _KOHYA_COMPONENTS[prefix[1]] if prefix is not None else None
    if allowed is not None:
        return [c for c in allowed if c in present][:1], layer
    return list(present), layer


def _names(keys: dict[str, Path]) -> dict[str, str]:
    """Stored keys by their layer-name form ``<layer>.<suffix>`` (the first key wins where two collide)."""
    names: dict[str, str] = {}
    for key in keys:
        module, dot, suffix = key.rpartition(".")
        if dot:
            names.setdefault(f"{layer_name(module.removesuffix('.base_layer'))}.{suffix}", key)
    return names


def as_matrix(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A base weight as the analysed (out, in·k…) matrix of a layer of ``kind``.

    GPT-2's Conv1D stores (in, out) and an embedding (V, d): both are transposed (the analysed matrix of an
    embedding is (d, V), as for its LoRA update); a conv's (out, in, *k) is flattened to (out, in·∏k).
    """
    if kind in ("conv1d_gpt2", "embedding", "expert_transposed"):  # an expert slice stored (in, out): lora_params
        return weight.T
    return weight.reshape(weight.shape[0], -1)
