"""Checkpoint files: finding them (local folder or hub id), reading sharded safetensors, converting between a
published parameter layout and our module tree, and writing checkpoints back in the published layout.

A :class:`Layout` is a table of :class:`Rule` s. Each rule relates a group of *our* parameters to a group of
*original* (published) tensors, e.g. timm's fused ``attn.qkv.weight`` <-> transformers' ``q_proj/k_proj/v_proj``.
The table is the documentation of the mapping, and it runs in both directions: loading (original -> ours) and
saving or proving the layout (ours -> original), also on the meta device.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from huggingface_hub import snapshot_download, split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN

from .. import files
from ..errors import CheckpointError

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"

# Placeholders allowed in rule templates and what they match.
_PLACEHOLDERS = {"i": r"\d+", "p": r"weight|bias", "rest": r".+"}


def _identity(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(tensors)


@dataclass(frozen=True)
class Rule:
    """A group of our parameters <-> a group of original tensors.

    ``ours`` and ``original`` are templates relative to the layout prefixes, with placeholders ``{i}``
    (a layer number), ``{p}`` (weight|bias) and ``{rest}`` (anything). ``to_ours`` turns the original tensors
    (in template order) into ours; ``to_original`` is its inverse. A rule with no ``original`` templates names
    parameters that the published checkpoint does not carry (they keep their initialised value and are not saved).
    """

    ours: tuple[str, ...]
    original: tuple[str, ...]
    to_ours: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _identity
    to_original: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _identity
    note: str = ""

    def pattern(self, template: str) -> re.Pattern:
        regex = re.escape(template)
        for name, sub in _PLACEHOLDERS.items():
            regex = regex.replace(re.escape("{" + name + "}"), f"(?P<{name}>{sub})")
        return re.compile(regex + r"\Z")


@dataclass
class Layout:
    """A conversion table between our parameter names and a published checkpoint's tensor names.

    ``prefixes`` pairs (our_prefix, original_prefix) for groups of rules, e.g.
    ("vision_backbone.featurizer.", "vision_backbone.featurizer.").
    """

    sections: list[tuple[str, str, tuple[Rule, ...]]] = field(default_factory=list)

    def add(self, our_prefix: str, original_prefix: str, rules: Sequence[Rule]) -> "Layout":
        self.sections.append((our_prefix, original_prefix, tuple(rules)))
        return self

    def groups(self, our_names: Iterable[str]) -> list[tuple[Rule, list[str], list[str]]]:
        """Match our parameter names to rules; return (rule, our full names, original full names) per group."""
        groups: dict[tuple, tuple[Rule, list[str], list[str]]] = {}
        unmatched = []
        compiled = [
            (our_prefix, original_prefix, rule, [rule.pattern(t) for t in rule.ours])
            for our_prefix, original_prefix, rules in self.sections
            for rule in rules
        ]
        for name in our_names:
            for our_prefix, original_prefix, rule, patterns in compiled:
                if not name.startswith(our_prefix):
                    continue
                tail = name[len(our_prefix):]
                match = next((p.match(tail) for p in patterns if p.match(tail)), None)
                if match is None:
                    continue
                fields = match.groupdict()
                key = (our_prefix, id(rule), tuple(sorted(fields.items())))
                if key not in groups:
                    ours = [our_prefix + t.format(**fields) for t in rule.ours]
                    original = [original_prefix + t.format(**fields) for t in rule.original]
                    groups[key] = (rule, ours, original)
                break
            else:
                unmatched.append(name)
        if unmatched:
            raise CheckpointError(f"no layout rule covers these parameters: {unmatched[:8]}")
        return list(groups.values())

    def to_original(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict -> the published layout (works on meta tensors)."""
        out = {}
        for rule, ours, original in self.groups(state):
            if not original:
                continue
            tensors = rule.to_original([state[name] for name in ours])
            out.update(zip(original, tensors))
        return out


class SafetensorsCheckpoint:
    """Read access to a (possibly sharded) safetensors checkpoint folder, tensor by tensor (memory-mapped)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (KeyError, json.JSONDecodeError) as error:
                raise CheckpointError(f"{index} is not a valid safetensors index: {error}") from error
        elif (self.folder / SAFE_SINGLE).is_file():
            weight_map = None
        else:
            raise CheckpointError(
                f"no weights in {self.folder}: expected {SAFE_INDEX} (sharded) or {SAFE_SINGLE}; "
                f"found {sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else 'no folder'}"
            )
        if weight_map is None:
            handle = open_safetensors(self.folder / SAFE_SINGLE)
            self._handles = {SAFE_SINGLE: handle}
            self.weight_map = {key: SAFE_SINGLE for key in handle.keys()}
        else:
            files = sorted(set(weight_map.values()))
            missing = [name for name in files if not (self.folder / name).is_file()]
            if missing:
                raise CheckpointError(
                    f"partial checkpoint in {self.folder}: the index lists {len(files)} shard file(s) but "
                    f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
                )
            self._handles = {name: open_safetensors(self.folder / name) for name in files}
            self.weight_map = dict(weight_map)
            for name, handle in self._handles.items():
                present = set(handle.keys())
                absent = [k for k, f in weight_map.items() if f == name and k not in present]
                if absent:
                    raise CheckpointError(f"shard {name} in {self.folder} lacks tensors its index lists: {absent[:5]}")

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self.weight_map[key]].get_tensor(key)
        except KeyError:
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint at {self.folder}") from None
        except SafetensorError as error:
            raise CheckpointError(f"cannot read {key!r} from {self.folder / self.weight_map[key]}: {error}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self.weight_map[key]].get_slice(key).get_shape())


def open_safetensors(path: Path):
    """``safe_open`` with a CheckpointError naming the file when it is truncated or not safetensors."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt? {error}); re-download or re-save it"
        ) from None


def validate_safetensors(folder: Path) -> None:
    """Open every ``*.safetensors`` file of a checkpoint folder once (header and size), naming a broken one."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        open_safetensors(path)


def check_activations(configs: Iterable, family: str) -> None:
    """Refuse a ``hidden_act`` transformers cannot build, and a Gemma ``hidden_activation`` it would ignore."""
    seen: set[int] = set()
    pending = list(configs)
    while pending:
        config = pending.pop()
        if id(config) in seen:
            continue
        seen.add(id(config))
        pending += [v for v in vars(config).values() if isinstance(v, PreTrainedConfig)]
        name = getattr(config, "model_type", type(config).__name__)
        act = getattr(config, "hidden_act", None)
        if isinstance(act, str) and act not in ACT2FN:
            raise CheckpointError(
                f"{family}: the {name} config asks for hidden_act={act!r}, which transformers does not implement "
                f"(supported: {', '.join(sorted(ACT2FN))})"
            )
        other = getattr(config, "hidden_activation", None)
        if other is not None and other != act and not (act == "gelu_pytorch_tanh" and other == "gelu"):
            raise CheckpointError(
                f"{family}: the {name} config sets hidden_activation={other!r} but the model is built with "
                f"hidden_act={act!r} (transformers ignores hidden_activation); make them agree"
            )


def _numbers(values: Any, where: str) -> np.ndarray:
    if not isinstance(values, (list, tuple)) or not values:
        raise CheckpointError(f"{where} must be a non-empty list of numbers, got {values!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise CheckpointError(f"{where} must hold numbers only, got {values!r}")
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)):
        raise CheckpointError(f"{where} holds NaN or infinite values: {values!r}")
    return array


def check_quantiles(stats: Any, where: str) -> int:
    """Dataset statistics with ``q01`` and ``q99``: numbers, equal lengths, ``q01 <= q99``. Returns the length."""
    if not isinstance(stats, Mapping) or "q01" not in stats or "q99" not in stats:
        raise CheckpointError(f"{where} must hold q01 and q99 (the 1st and 99th percentiles)")
    q01, q99 = _numbers(stats["q01"], f"{where}['q01']"), _numbers(stats["q99"], f"{where}['q99']")
    if q01.shape != q99.shape:
        raise CheckpointError(f"{where}: q01 has {q01.size} values but q99 has {q99.size}")
    if np.any(q01 > q99):
        dims = np.nonzero(q01 > q99)[0].tolist()
        raise CheckpointError(f"{where}: q01 > q99 in dimension(s) {dims} (q01={q01.tolist()}, q99={q99.tolist()})")
    return int(q01.size)


def resolve_folder(source: str | os.PathLike, revision: str | None = None, patterns: Sequence[str] = ()) -> Path:
    """A local checkpoint folder for ``source``: the folder itself, or a hub snapshot downloaded on demand."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass the checkpoint folder that holds config.json and the weights")
    if str(source).startswith((".", "/", "~")) or os.sep in str(source) and str(source).count("/") > 1:
        raise CheckpointError(f"checkpoint folder {source} does not exist")
    try:
        return Path(snapshot_download(repo_id=str(source), revision=revision, allow_patterns=list(patterns) or None))
    except Exception as error:  # noqa: BLE001 - every hub failure becomes one actionable message
        raise CheckpointError(
            f"could not get {source!r} (revision {revision or 'main'}) from the Hugging Face hub: "
            f"{type(error).__name__}: {error}. Pass a local checkpoint folder instead, or check the id and network."
        ) from error


def read_json(folder: Path, name: str) -> dict:
    """A JSON file of a checkpoint folder, with an error naming the folder when it is missing or broken."""
    file = folder / name
    if not file.is_file():
        raise CheckpointError(f"{folder} has no {name}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from error


def read_config(folder: Path, config_class: type, model_type: str, hint: str):
    """``config_class.from_pretrained(folder)`` after checking ``config.json``'s ``model_type``; ``hint`` says
    what the family loads instead when the type differs."""
    found = read_json(folder, "config.json").get("model_type")
    if found != model_type:
        raise CheckpointError(f"{folder} holds a {found!r} model; {hint}")
    try:
        return config_class.from_pretrained(str(folder))
    except Exception as error:  # noqa: BLE001 - one actionable message for a broken config
        raise CheckpointError(f"{folder} is not a valid {model_type!r} checkpoint: {error}") from error


def load_tokenizer(folder: Path, **kwargs):
    """The checkpoint's tokenizer (``AutoTokenizer``), with an error naming the folder."""
    try:
        return AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"could not load the tokenizer from {folder}: {error}") from error


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through a temp file and a rename, so a reader never sees half a file."""
    files.write_json(path, data, indent=2)


def save_safetensors(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB") -> None:
    """Save a state dict as (possibly sharded) safetensors with an HF-style index, like ``save_pretrained``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        write_json_atomic(folder / SAFE_INDEX, {"metadata": split.metadata, "weight_map": split.tensor_to_filename})


def load_layout(
    model: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    layout: Layout,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Fill a meta-built ``model`` with the checkpoint's tensors converted through ``layout``.

    Raises CheckpointError for missing tensors, tensors the model does not use, and shape mismatches, naming
    the first few of each.
    """
    params = dict(model.named_parameters())
    persistent = {
        name: buf for name, buf in model.named_buffers() if name.rsplit(".", 1)[-1] not in _non_persistent(model, name)
    }
    targets = {**params, **persistent}
    used: set[str] = set()
    missing: list[str] = []
    problems: list[str] = []
    available = set(checkpoint.keys())
    for rule, ours, original in layout.groups(targets):
        if not original:
            continue
        absent = [name for name in original if name not in available]
        if absent:
            missing.extend(absent)
            continue
        tensors = rule.to_ours([checkpoint.get(name) for name in original])
        used.update(original)
        for name, tensor in zip(ours, tensors):
            expected = tuple(targets[name].shape)
            if tuple(tensor.shape) != expected:
                problems.append(f"{name}: checkpoint gives {tuple(tensor.shape)}, model expects {expected}")
                continue
            _assign(model, name, tensor, dtype or targets[name].dtype, device)
    unexpected = sorted(available - used)
    if missing or problems or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[:5]}")
        if problems:
            parts.append(f"{len(problems)} shape mismatch(es): {problems[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) the model does not use, e.g. {unexpected[:5]}")
        raise CheckpointError(
            f"checkpoint at {checkpoint.folder} does not match the model ({type(model).__name__}): " + "; ".join(parts)
        )


def _non_persistent(model: nn.Module, name: str) -> set[str]:
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return owner._non_persistent_buffers_set


def _assign(model: nn.Module, name: str, tensor: torch.Tensor, dtype, device) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    value = tensor.to(dtype=dtype if tensor.is_floating_point() else tensor.dtype, device=device or "cpu")
    current = getattr(owner, attr)
    if isinstance(current, nn.Parameter):
        new = nn.Parameter(value, requires_grad=current.requires_grad)
        new._is_hf_initialized = True  # tells transformers' initialize_weights not to overwrite it
        setattr(owner, attr, new)
    else:
        owner._buffers[attr] = value
        value._is_hf_initialized = True


def materialize_rest(model: nn.Module, device: torch.device | str | None = None) -> None:
    """After loading: give every tensor still on meta (non-persistent buffers, parameters the checkpoint does not
    carry) real storage, then let transformers' own initialisers fill them (RoPE frequencies, position ids,
    zero-initialised tokens)."""
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, attr, nn.Parameter(torch.zeros_like(param, device=device or "cpu")))
    for name, buf in list(model.named_buffers()):
        if buf is not None and buf.is_meta:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._buffers[attr] = torch.zeros_like(buf, device=device or "cpu")
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.initialize_weights()
            break
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta]
    if leftovers:
        raise CheckpointError(f"tensors left uninitialised after loading: {leftovers[:5]}")


# ---------------------------------------------------------------------------------------------------------------
# meta builds and loaded storage


def repair_meta_device_context() -> None:
    """Undo a process-wide side effect of transformers' ``from_pretrained`` on meta builds.

    ``from_pretrained`` swaps ``torch.linspace`` for a CPU-defaulting wrapper while it builds on meta. If that is
    the first time torch evaluates its (``lru_cache``-d) list of device-aware constructors, the list keeps the
    wrapper and loses the real ``torch.linspace``: from then on ``torch.device("meta")`` (and nnsight's meta build)
    no longer moves ``linspace`` tensors to meta, and pi0's timestep frequencies land on the CPU. Re-evaluate the
    list when it lacks the real function (torch private API, hence the guard).
    """
    try:
        from torch.utils import _device

        if torch.linspace not in _device._device_constructors():
            _device._device_constructors.cache_clear()
    except (ImportError, AttributeError):  # pragma: no cover - a torch without this cache
        pass


def move_strays_to_meta(module: nn.Module) -> nn.Module:
    """After a meta build: put any buffer that was created off the meta device on it (structure only)."""
    for owner in module.modules():
        for name, buf in list(owner._buffers.items()):
            if buf is not None and not buf.is_meta:
                owner._buffers[name] = torch.empty_like(buf, device="meta")
    return module


def realign_storage(module: nn.Module, alignment: int = 64) -> nn.Module:
    """Give every CPU parameter/buffer whose data is not ``alignment``-byte aligned its own (aligned) copy.

    ``from_pretrained`` can leave CPU tensors at arbitrary offsets of the safetensors file; torch's CPU kernels then
    take another vectorisation path and round differently in the last bit, so a reloaded tiny checkpoint would not
    reproduce its source exactly. Copies are made one tensor at a time; tied tensors stay tied.
    """
    copies: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % alignment:
                key = id(tensor)
                if key not in copies:
                    copies[key] = tensor.data.clone()
                tensor.data = copies[key]
    return module
