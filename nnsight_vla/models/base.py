"""The model class every VLA family builds on: an nnsight model with one uniform module tree.

``VLA`` subclasses nnsight's ``Remotable``: the constructor builds the module on the meta device (no weights)
unless asked to dispatch; real weights arrive on the first run. :meth:`VLA._build` is the one build skeleton
(meta / tiny / checkpoint) with small per-family hooks. Every family exposes ``vla.layers[i].mlp.act`` (the MLP
post-activation, TransformerLens ``hook_post``), ``lm_head``, the stack dimensions, ``action_token_ids`` and a
traceable ``predict_action`` whose ``tracer.iter[:]`` reaches every forward that produces the action.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
from types import MappingProxyType
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
from nnsight.intervention.interleaver import OutOfOrderError
from nnsight.modeling.mixins.remotable import Remotable
from nnsight.tracing.tracer import WithBlockNotFoundError
from torch import nn

from ..errors import CheckpointError, IndexOutOfRangeError, InputError
from ..remote.backend import remote_backend
from ..remote.keys import describe_checkpoint, rebuild_from_key
from .batching import (
    Observation,
    VLABatcher,
    as_call,
    batch_size,
    combine_invokes,
    concat_tensor_invokes,
    is_raw,
    split,
)
from .checkpoints import (
    check_activations,
    move_strays_to_meta,
    realign_storage,
    repair_meta_device_context,
    validate_safetensors,
)
from .tree import Stack, check_activation_shapes, check_weight_shapes, install_uniform_tree, stack_shapes

# Persistent ids of the per-model objects a remote request references instead of serialising.
PERSISTENT = {"tokenizer": "Tokenizer", "image_processor": "ImageProcessor", "action_tokenizer": "ActionTokenizer"}


def traceable(method: Callable) -> Callable:
    """Like nnsight's ``traceable``: ``with vla.method(...) as tracer:`` traces the call, a plain call just runs it.

    nnsight decides by looking for a ``with`` statement on the caller's line, so a one-liner such as
    ``with steer.apply(vla): action = vla.predict_action(...)`` would hand back an unused tracer instead of running.
    Here the ``with`` must also be *this* call (one of its context expressions calls ``method``); otherwise the
    call runs directly.
    """

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        fn = method.__get__(self, type(self))
        if self.interleaver.interleaving:
            return method(self, *args, **kwargs)
        tracer = self.trace(*args, fn=fn, **kwargs)
        try:
            tracer.capture()
        except WithBlockNotFoundError:
            return self.interleave(fn, *args, **kwargs)
        if not _opens_with(tracer.node, method.__name__):
            return self.interleave(fn, *args, **kwargs)
        return tracer

    return wrapper


def _opens_with(node: Any, name: str) -> bool:
    """Whether a ``with`` node has a context expression that calls ``<something>.name(...)``."""
    for item in getattr(node, "items", ()):
        call = item.context_expr
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == name:
            return True
    return False


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` / None -> a torch dtype (or None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or 'float16'")
    return value


class VLA(Remotable):
    """Base class of the traced VLA families. Use :func:`nnsight_vla.load` or :func:`nnsight_vla.tiny`.

    Args:
        source: a local checkpoint folder or a Hugging Face hub id (None for a tiny model).
        revision: hub revision (branch, tag or commit).
        dtype: weight dtype (default: the checkpoint's own, float32 for tiny models).
        device: where the weights go on dispatch (default "cpu").
        tiny: ``{"seed": int, "config": {...}}`` builds a small random model of the exact architecture offline.
        dispatch: load the weights now instead of on the first run.
        check: run the uniform-tree scan after building (on by default).
    """

    family: ClassVar[str] = ""
    #: the stacks of decoder layers carrying ``mlp.act`` (first one is the language backbone)
    stacks: ClassVar[tuple[Stack, ...]] = ()
    #: path of the unembedding inside the torch module
    lm_head_path: ClassVar[str] = ""
    #: cameras the model consumes, in order
    camera_names: ClassVar[tuple[str, ...]] = ("primary",)
    #: the transformers model class built from ``self.config`` (and loaded by the default :meth:`_load_weights`)
    model_class: ClassVar[type] = nn.Module
    #: attention implementation forced on ``self.config`` and on ``from_pretrained`` (None: the model's choice)
    attn_implementation: ClassVar[str | None] = None
    #: the family's load options as given (None: unset); set ones travel in the model key
    family_options: Mapping[str, Any] = MappingProxyType({})
    #: options that may differ between the elements of a batch -> the dimensions of one element's value
    per_element_options: ClassVar[Mapping[str, int]] = MappingProxyType({})
    #: nnsight's batcher, which also scopes the numpy ``tracer.result`` to an invoke's rows
    _batcher_class = VLABatcher

    def __init__(
        self,
        source: Any = None,
        *,
        revision: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        tiny: Mapping | None = None,
        dispatch: bool = False,
        check: bool = True,
        **kwargs: Any,
    ) -> None:
        self.checkpoint = None if source is None or isinstance(source, nn.Module) else str(source)
        # the remote key names a local folder by its absolute path, fixed now (the working directory may change)
        self._key_source = (
            os.path.abspath(self.checkpoint) if self.checkpoint is not None and os.path.isdir(self.checkpoint)
            else self.checkpoint
        )
        self.revision = revision
        self.dtype_name = None if dtype is None else str(resolve_dtype(dtype)).removeprefix("torch.")
        self.device_name = None if device is None else str(device)
        self.tiny_spec = (
            None if tiny is None else {"seed": int(tiny.get("seed", 0)), "config": dict(tiny.get("config", {}))}
        )
        for attr in PERSISTENT:
            setattr(self, attr, None)
        rename = {stack.path: stack.attr for stack in self.stacks}
        rename[self.lm_head_path] = "lm_head"
        kwargs.setdefault("rename", rename)
        load_kwargs = {
            "revision": revision, "dtype": self.dtype_name, "device": self.device_name, "tiny": self.tiny_spec
        }
        # a tiny model is built with real weights right away: it is small and its weights come from a seed
        super().__init__(source, dispatch=dispatch or tiny is not None, **load_kwargs, **kwargs)
        if check:
            self.check_tree()

    # -- building (families implement _load_processors and the _build hooks) ---------------------------------------

    def _load_processors(self, source, *, revision, tiny) -> None:
        """Set ``self.config``, ``self.tokenizer`` and the family's other preprocessing objects."""
        raise NotImplementedError

    def _build(self, *, dtype: Any, device: Any, tiny: Mapping | None, meta: bool) -> nn.Module:
        """Build the torch module: the structure only (``meta``), a seeded tiny model, or a checkpoint's weights."""
        if self.attn_implementation is not None:
            self.config._attn_implementation = self.attn_implementation
        if meta:
            return self._new_module()
        dtype = resolve_dtype(dtype) or torch.float32
        if tiny is not None:
            torch.manual_seed(int(tiny.get("seed", 0)))
            module = self._init_tiny(self._new_module())
            return module.to(dtype=dtype, device=device or "cpu")
        return self._load_weights(dtype, device)

    def _new_module(self) -> nn.Module:
        """A freshly initialised module of ``self.config`` (on the current default device)."""
        return self.model_class(self.config)

    def _init_tiny(self, module: nn.Module) -> nn.Module:
        """Adjust a freshly seeded tiny module (hook; the default keeps it as built)."""
        return module

    def _load_weights(self, dtype: torch.dtype, device: Any) -> nn.Module:
        """The checkpoint in ``self.folder`` with real weights; default: transformers' ``from_pretrained``."""
        validate_safetensors(self.folder)
        try:
            module = self.model_class.from_pretrained(
                str(self.folder), dtype=dtype, attn_implementation=self.attn_implementation
            )
        except (OSError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"could not load the {self.family} weights from {self.folder}: {error}") from error
        return realign_storage(module.to(device or "cpu"))

    def _finish(self, module: nn.Module) -> nn.Module:
        install_uniform_tree(module, self.stacks)
        module.eval()
        return module

    def _activation_configs(self) -> list:
        """The configs whose ``hidden_act`` builds modules (checked before building)."""
        return [self.config]

    def _load_meta(self, source, revision=None, dtype=None, device=None, tiny=None, **_: Any) -> nn.Module:
        self._load_processors(source, revision=revision, tiny=tiny)
        check_activations(self._activation_configs(), self.family)
        repair_meta_device_context()
        module = self._build(dtype=dtype, device=device, tiny=tiny, meta=True)
        return self._finish(move_strays_to_meta(module))

    def _load(self, source, revision=None, dtype=None, device=None, tiny=None, **_: Any) -> nn.Module:
        if self.tokenizer is None:
            self._load_processors(source, revision=revision, tiny=tiny)
            check_activations(self._activation_configs(), self.family)
        return self._finish(self._build(dtype=dtype, device=device, tiny=tiny, meta=False))

    def _wrap(self, module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        raise TypeError(f"build {type(self).__name__} with nnsight_vla.load(...) or nnsight_vla.tiny(...)")

    # -- the uniform surface ----------------------------------------------------------------------------------------

    def stack(self, name: str = "backbone") -> Stack:
        """The :class:`Stack` called ``name`` ("backbone" or, for pi0, "expert")."""
        for stack in self.stacks:
            if name in (stack.name, stack.attr):
                return stack
        raise InputError(
            f"{self.family} has no {name!r} stack; it has {', '.join(s.name for s in self.stacks)}"
        )

    def stack_dims(self, name: str = "backbone") -> tuple[int, int, int]:
        """(num_layers, d_model, d_mlp) of a stack."""
        return stack_shapes(self._module, self.stack(name))

    @property
    def num_layers(self) -> int:
        """Number of decoder layers of the language backbone."""
        return self.stack_dims()[0]

    @property
    def d_model(self) -> int:
        """Residual width of the language backbone."""
        return self.stack_dims()[1]

    @property
    def d_mlp(self) -> int:
        """MLP width (number of value vectors per layer) of the language backbone."""
        return self.stack_dims()[2]

    @property
    def vocab_size(self) -> int:
        """Rows of the unembedding (including any padding rows)."""
        return int(self._module.get_submodule(self.lm_head_path).weight.shape[0])

    @property
    def action_token_ids(self) -> np.ndarray:
        """Vocabulary ids that encode actions (sorted). Raises for a family without action tokens."""
        raise NotImplementedError

    @property
    def state_dim(self) -> int | None:
        """Dimension of the robot state the model takes, or None when it takes none."""
        return None

    @property
    def action_dim(self) -> int:
        raise NotImplementedError

    @property
    def action_horizon(self) -> int:
        """Actions returned per call: 1 for single-step models, H for chunking models."""
        return 1

    def _horizon(self, horizon: Any) -> int:
        """A ``horizon=`` argument checked against the chunk length (None: the whole chunk)."""
        if horizon is None:
            return self.action_horizon
        is_int = isinstance(horizon, (int, np.integer)) and not isinstance(horizon, bool)
        if not is_int or not 1 <= horizon <= self.action_horizon:
            raise InputError(
                f"{self.family} makes chunks of {self.action_horizon} actions; "
                f"horizon must be 1..{self.action_horizon}, got {horizon!r}"
            )
        return int(horizon)

    def forward_count(self, **predict_kwargs: Any) -> int:
        """Root forward passes in one ``predict_action`` call with these keyword arguments (``tracer.iter`` bound)."""
        raise NotImplementedError

    def stack_forwards(self, stack: str = "backbone", **predict_kwargs: Any) -> list[int]:
        """The ``tracer.iter`` indices of the forwards in which ``stack``'s layers run (default: all of them)."""
        self.stack(stack)
        return list(range(self.forward_count(**predict_kwargs)))

    def check_layer(self, layer: int, stack: str = "backbone") -> int:
        """Validate a layer index (negative indices count from the end); return it non-negative."""
        num_layers = self.stack_dims(stack)[0]
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
            raise InputError(f"layer index must be an int, got {layer!r}")
        if not -num_layers <= layer < num_layers:
            raise IndexOutOfRangeError(
                f"layer {layer} is out of range for the {stack} stack of {self.family}, which has "
                f"{num_layers} layers (valid: 0..{num_layers - 1}, or negative from the end)"
            )
        return int(layer) % num_layers

    def value_vectors(self, layer: int, stack: str = "backbone") -> torch.Tensor:
        """The (d_model, d_mlp) ``down_proj.weight`` of a layer: column i is value vector i."""
        layer = self.check_layer(layer, stack)
        layers = self._module.get_submodule(self.stack(stack).path)
        return layers[layer].mlp.down_proj.weight

    def unembedding(self) -> torch.Tensor:
        """The (vocab, d_model) unembedding matrix (``lm_head.weight``)."""
        return self._module.get_submodule(self.lm_head_path).weight

    def input_embeddings(self) -> torch.Tensor:
        """The (vocab, d_model) input token-embedding matrix of the language backbone."""
        raise NotImplementedError

    # -- inference ----------------------------------------------------------------------------------------------

    @traceable
    def predict_action(
        self, images: Any = None, instruction: Any = None, state: Any = None, **kwargs: Any
    ) -> np.ndarray:
        """Predict the next action (or action chunk) from camera image(s), an instruction and optional state.

        A batch: a list of instructions with a list of images entries (and of states) gives the actions stacked
        on a leading axis, element i equal to the single call on observation i. Traceable: ``with
        vla.predict_action(...) as tracer:`` runs it interleaved with the block (``tracer.iter[:]`` reaches every
        forward that produces the action); ``tracer.invoke(...)`` blocks batch their observations.
        """
        if "input_ids" in kwargs or "pixel_values" in kwargs:
            raise InputError(
                "predict_action takes observations, (images, instruction[, state]), and builds the prompt itself; "
                "a hub processor's input_ids / pixel_values are not accepted (vla.trace(input_ids=..., ...) is)"
            )
        per = {key: kwargs.pop(key) for key in list(kwargs) if key in self.per_element_options}
        observations, batched = split(images, instruction, state, per, self.per_element_options)
        actions = self._predict_batch(observations, **kwargs)
        return actions if batched else actions[0]

    def _predict_batch(self, observations: list[Observation], **kwargs: Any) -> np.ndarray:
        """The actions (B, ...) of a batch of observations (each element as its single call)."""
        raise NotImplementedError

    def forward_inputs(self, images: Any, instruction: Any, state: Any = None, **options: Any) -> dict:
        """The module's keyword inputs for the first forward of ``predict_action`` on these observations (one,
        or a batch: prompts padded as the family's published code pads them). ``vla.trace(image, instruction)``
        runs exactly this forward."""
        per = {key: options.pop(key) for key in list(options) if key in self.per_element_options}
        return self._forward_batch(split(images, instruction, state, per, self.per_element_options)[0], **options)

    def _forward_batch(self, observations: list[Observation], **options: Any) -> dict:
        raise NotImplementedError

    # -- nnsight's batching hooks: rows per invoke, and the one batched input of several invokes -----------------

    def _batch_size(self, *inputs: Any, **kwargs: Any) -> int:
        return batch_size(inputs, kwargs)

    def _batch(self, invokes: list[tuple], fn: Any) -> tuple:
        if not invokes:
            return (), {}
        if getattr(fn, "__name__", None) == "predict_action":
            if len(invokes) == 1:
                return invokes[0]
            observations, shared = combine_invokes(invokes, self.per_element_options)
            args, kwargs = as_call(observations, self.per_element_options)
            return args, {**shared, **kwargs}
        if not any(is_raw(args, kwargs) for args, kwargs in invokes):
            return invokes[0] if len(invokes) == 1 else concat_tensor_invokes(invokes)
        observations, shared = combine_invokes(invokes, self.per_element_options)
        return (), self._forward_batch(observations, **shared)

    def interleave(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if "remote" in kwargs or "backend" in kwargs:
            # a direct (non-`with`) call keeps remote=/backend= in its kwargs; refuse before weights are loaded
            raise InputError(
                "remote= / backend= need a trace: `with vla.predict_action(..., remote=True) as tracer: "
                "action = tracer.result.save()`, or nnsight_vla.remote.remote_predict_action(vla, ...)"
            )
        try:
            return super().interleave(fn, *args, **kwargs)
        except OutOfOrderError as error:
            message = self._never_run_message(str(error))
            if message is None:
                raise
            raise InputError(message) from None

    # -- modules that never run ------------------------------------------------------------------------------

    def never_run(self) -> list[tuple[str, bool, str]]:
        """Modules of the torch tree that no forward of this family runs: ``(path, whole subtree, why)``.

        Reading one in a trace raises an InputError naming it (instead of nnsight's "already ran past it")."""
        return []

    def _never_run_message(self, error: str) -> str | None:
        match = re.search(r"'model\.?(.*?)\.(?:output|input|inputs)(?:\.[^.']*)?' was requested", error)
        if match is None:
            return None
        path = match.group(1)
        for where, subtree, why in self.never_run():
            if path == where or (subtree and path.startswith(where + ".")):
                return f"{path} is not used by {self.family}: {why}; it never runs, so its .input/.output do not exist"
        return None

    def images_by_camera(self, images: Any) -> list[Any]:
        """Normalise ``images`` (one array, a sequence in camera order, or a {camera: array} mapping) to a list
        in ``camera_names`` order, with an error naming the missing camera."""
        names = self.camera_names
        if isinstance(images, Mapping):
            missing = [name for name in names if name not in images]
            if missing:
                raise InputError(
                    f"{self.family} needs camera(s) {', '.join(names)}; missing {', '.join(missing)} "
                    f"(got {', '.join(map(str, images)) or 'none'})"
                )
            return [images[name] for name in names]
        if isinstance(images, (list, tuple)):
            if len(images) != len(names):
                raise InputError(
                    f"{self.family} needs {len(names)} camera image(s) ({', '.join(names)}), got {len(images)}"
                    " (for a batch, pass a list of instructions with one images entry each)"
                )
            return list(images)
        if len(names) != 1:
            raise InputError(f"{self.family} needs {len(names)} camera images ({', '.join(names)}), got one")
        return [images]

    # -- checks ------------------------------------------------------------------------------------------------

    def _scan_call(self) -> tuple[Any, tuple, dict]:
        """(fn, args, kwargs) of one forward pass that reaches every stack, for :meth:`check_tree`."""
        raise NotImplementedError

    def check_tree(self) -> None:
        """Prove the uniform tree: every renamed module exists with the expected shapes.

        Weight shapes are checked directly; activation shapes by an nnsight ``scan`` (fake tensors, no compute)
        of one forward pass that reads ``mlp.act``, ``mlp.down_proj`` and ``lm_head`` of every layer.
        """
        expected: dict[str, tuple] = {}
        for stack in self.stacks:
            check_weight_shapes(self._module, stack)
            num_layers, d_model, d_mlp = self.stack_dims(stack.name)
            for i in range(num_layers):
                expected[f"{stack.attr}[{i}].mlp.act"] = (d_mlp,)
                expected[f"{stack.attr}[{i}].mlp.down_proj"] = (d_model,)
        expected["lm_head"] = (self.vocab_size,)
        observed = self._scan_shapes()
        check_activation_shapes(observed, expected)

    def _scan_shapes(self) -> dict[str, tuple]:
        fn, args, kwargs = self._scan_call()
        observed: dict[str, tuple] = {}
        envoys = [(f"{s.attr}[{i}]", layer) for s in self.stacks for i, layer in enumerate(getattr(self, s.attr))]
        with self.scan(*args, fn=fn, **kwargs):
            for where, layer in envoys:
                observed[f"{where}.mlp.act"] = tuple(layer.mlp.act.output.shape)
                observed[f"{where}.mlp.down_proj"] = tuple(layer.mlp.down_proj.output.shape)
            observed["lm_head"] = tuple(self.lm_head.output.shape)
        return observed

    # -- TransformerLens --------------------------------------------------------------------------------------

    def to_transformer_lens(self, stack: str = "backbone"):
        """A TransformerLens ``TransformerBridge`` over the language backbone (offline), exposing
        ``blocks.{l}.mlp.hook_post`` (= ``mlp.act`` output). Shares weights with this model."""
        raise NotImplementedError

    # -- remote ------------------------------------------------------------------------------------------------

    def _remoteable_model_key(self) -> str:
        # Everything the server needs to rebuild THIS model (the class path in front names the family): the
        # checkpoint (an existing local folder as an absolute path: the server reads the same path), the revision,
        # the dtype asked for or "auto" (the family's default for the source, rebuilt the same way server-side:
        # the server's own default dtype must not decide it), for tiny models the config overrides and seed, and
        # the family's load options that were set. Sorted keys: the key string is the server's deployment identity.
        data = {"family": self.family, "source": self._key_source, "revision": self.revision,
                "dtype": self.dtype_name or "auto"}
        if self.tiny_spec is not None:
            data["tiny"] = self.tiny_spec
        data.update({k: v for k, v in self.family_options.items() if v is not None})
        return json.dumps(data, sort_keys=True)

    @classmethod
    def _remoteable_from_model_key(cls, model_key: str, **kwargs: Any) -> "VLA":
        # Takes what an NDIF model actor passes (dispatch, dtype, device, device_map, max_memory,
        # trust_remote_code); see nnsight_vla.remote.keys.rebuild_from_key.
        return rebuild_from_key(cls, model_key, **kwargs)

    @classmethod
    def _remoteable_describe_checkpoint(cls, model_key: str, dtype: str):
        # Sized in the dtype the key will really load with (not the server default), from a meta build.
        return describe_checkpoint(cls, model_key, dtype)

    def _remote_backend(self, remote: Any, blocking: bool, job_id: str | None, verbose: bool):
        # remote=True / URL / RemoteSettings -> bounded NDIF backend with clear errors; "local" -> nnsight's simulation
        return remote_backend(self, remote, blocking=blocking, job_id=job_id, verbose=verbose)

    def _remoteable_persistent_objects(self) -> dict:
        objects = super()._remoteable_persistent_objects()
        for attr, pid in PERSISTENT.items():
            if getattr(self, attr, None) is not None:
                objects[pid] = getattr(self, attr)
        return objects

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for attr, pid in PERSISTENT.items():
            value = getattr(self, attr, None)
            if value is not None:
                value._persistent_id = pid
        return state

    # -- misc --------------------------------------------------------------------------------------------------

    @property
    def model_key(self) -> str:
        """This model's identity (family class + checkpoint), as sent to a remote server."""
        return self.to_model_key()

    def save_pretrained(self, folder) -> None:
        """Save the model in its family's published checkpoint layout."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line: family, source, stacks and their dimensions."""
        parts = [f"{self.family} ({self.checkpoint or 'tiny'})"]
        for stack in self.stacks:
            n, d, m = self.stack_dims(stack.name)
            parts.append(f"{stack.attr}: {n} layers, d_model {d}, d_mlp {m}")
        return "; ".join(parts)


def check_instruction(instruction: Any) -> str:
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError(f"instruction must be a non-empty string, got {instruction!r}")
    return instruction


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int, or an InputError naming ``name`` unless it is a positive integer (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_camera_names(camera_names: Any) -> tuple[str, ...]:
    """A ``camera_names`` load option (one name or a sequence) as a tuple of distinct non-empty strings."""
    names = (camera_names,) if isinstance(camera_names, str) else tuple(camera_names)
    if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise InputError(f"camera_names must be distinct non-empty strings, got {camera_names!r}")
    return names
