"""The uniform module tree: every gated MLP of every family exposes ``mlp.act``.

A gated MLP computes ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; the paper reads column i of
``down_proj.weight`` as a value vector and ``f(x)_i`` (the input of ``down_proj``) as its activation.
transformers computes f(x) inline, so a parameter-free identity ``act`` is inserted and f(x) routed through it:
``mlp.act.output`` is the activation (TransformerLens's ``hook_post``). The swap gives each MLP instance a
subclass whose forward calls ``act``, on the bare module before nnsight wraps it; parameter names are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError


class MLPActivation(nn.Identity):
    """``mlp.act``: an identity whose output is the MLP's post-activation ``act_fn(gate(x)) * up(x)``.

    Editing its output (``mlp.act.output[..., S] = alpha``) is editing the input of ``down_proj``.
    """


# one subclass per gated-MLP class, created on demand and registered in this module so pickle finds it
_UNIFORM_CLASSES: dict[type, type] = {}


def _uniform_forward(self, x):
    return self.down_proj(self.act(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


def uniform_class(cls: type) -> type:
    """The subclass of gated-MLP class ``cls`` whose forward routes f(x) through ``self.act``."""
    if getattr(cls, "_nnsight_vla_uniform", False):
        return cls
    if cls not in _UNIFORM_CLASSES:
        name = f"Uniform{cls.__name__}"
        sub = type(name, (cls,), {"forward": _uniform_forward, "_nnsight_vla_uniform": True, "__module__": __name__})
        sub.__qualname__ = name
        globals()[name] = sub
        _UNIFORM_CLASSES[cls] = sub
    return _UNIFORM_CLASSES[cls]


def install_act(mlp: nn.Module, where: str = "mlp") -> None:
    """Give one gated MLP an ``act`` submodule and route its forward through it (idempotent)."""
    missing = [name for name in ("gate_proj", "up_proj", "down_proj", "act_fn") if not hasattr(mlp, name)]
    if missing:
        raise CheckpointError(
            f"{where} ({type(mlp).__name__}) is not a gated MLP: it lacks {', '.join(missing)}; "
            "the uniform tree needs gate_proj, up_proj, down_proj and act_fn"
        )
    if not isinstance(getattr(mlp, "act", None), MLPActivation):
        mlp.act = MLPActivation()
    mlp.__class__ = uniform_class(type(mlp))


@dataclass(frozen=True)
class Stack:
    """One named stack of decoder layers whose MLPs carry the uniform ``mlp.act``.

    Attributes:
        name: the stack's name in neuron sets ("backbone" or "expert").
        attr: the attribute the layers are exposed under on the model ("layers" or "expert_layers").
        path: the dotted path of the layer list inside the torch module.
    """

    name: str
    attr: str
    path: str


def get_submodule(module: nn.Module, path: str) -> nn.Module:
    """``module.get_submodule(path)`` with an error that names the missing part."""
    try:
        return module.get_submodule(path)
    except AttributeError as error:
        raise CheckpointError(f"{type(module).__name__} has no module at {path!r}: {error}") from error


def install_uniform_tree(module: nn.Module, stacks: tuple[Stack, ...]) -> None:
    """Install ``mlp.act`` on every MLP of every stack of ``module``."""
    for stack in stacks:
        layers = get_submodule(module, stack.path)
        for index, layer in enumerate(layers):
            if not hasattr(layer, "mlp"):
                raise CheckpointError(f"{stack.path}.{index} has no `mlp` submodule")
            install_act(layer.mlp, where=f"{stack.path}.{index}.mlp")


def stack_shapes(module: nn.Module, stack: Stack) -> tuple[int, int, int]:
    """(num_layers, d_model, d_mlp) of a stack, read from its weights (works on the meta device)."""
    layers = get_submodule(module, stack.path)
    if len(layers) == 0:
        raise CheckpointError(f"stack {stack.name!r} at {stack.path!r} has no layers")
    d_mlp, d_model = layers[0].mlp.up_proj.weight.shape
    return len(layers), d_model, d_mlp


def check_weight_shapes(module: nn.Module, stack: Stack) -> None:
    """Every layer of a stack has the same gated-MLP shapes; ``down_proj`` reads d_mlp and writes d_model."""
    num_layers, d_model, d_mlp = stack_shapes(module, stack)
    layers = get_submodule(module, stack.path)
    for index, layer in enumerate(layers):
        mlp = layer.mlp
        expected = {
            "gate_proj": (d_mlp, d_model),
            "up_proj": (d_mlp, d_model),
            "down_proj": (d_model, d_mlp),
        }
        for name, shape in expected.items():
            got = tuple(getattr(mlp, name).weight.shape)
            if got != shape:
                raise CheckpointError(
                    f"{stack.path}.{index}.mlp.{name}.weight has shape {got}, expected {shape} "
                    f"(stack {stack.name!r}: d_model={d_model}, d_mlp={d_mlp})"
                )
        if not isinstance(getattr(mlp, "act", None), MLPActivation):
            raise CheckpointError(f"{stack.path}.{index}.mlp has no uniform `act` module")


def check_activation_shapes(observed: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Compare the trailing dimensions observed by a scan against the expected ones; name every mismatch."""
    problems = []
    for where, shape in expected.items():
        got = observed.get(where)
        if got is None:
            problems.append(f"{where}: never reached by the forward pass")
        elif tuple(got[-len(shape):]) != tuple(shape):
            problems.append(f"{where}: trailing shape {tuple(got)}, expected (..., {', '.join(map(str, shape))})")
    if problems:
        raise CheckpointError("the uniform module tree does not match the model:\n  " + "\n  ".join(problems))


def is_meta(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` still lives on the meta device."""
    return any(p.is_meta for p in module.parameters())


def first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())
