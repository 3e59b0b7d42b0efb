"""No silently wrong action, clear errors for modules that never run, checkpoint validation (issues 15 and 17).

Broken forwards are made with real NaN weights or a plain PyTorch forward hook (never through the code under
test); the modules that never run are measured with forward hooks on every module of a real predict_action.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nnsight_vla as nv
from nnsight_vla.errors import CheckpointError, InputError, ModelOutputError

FAMILIES = ["openvla", "pi0", "pi0-fast"]
INSTRUCTION = "pick up the black bowl"


@pytest.fixture(scope="module")
def models(tiny_families):
    return tiny_families


def predict(vla, images, instruction=INSTRUCTION, **kwargs):
    if vla.family == "openvla":
        return vla.predict_action(images["a"], instruction, **kwargs)
    return vla.predict_action({"base": images["a"], "wrist": images["b"]}, instruction, state=np.zeros(7), **kwargs)


@contextlib.contextmanager
def poisoned(param: torch.Tensor):
    """Fill a weight with NaN for the block (restored after)."""
    saved = param.detach().clone()
    with torch.no_grad():
        param.fill_(float("nan"))
    try:
        yield
    finally:
        with torch.no_grad():
            param.copy_(saved)


@contextlib.contextmanager
def output_hook(module: nn.Module, call: int, value: float):
    """A plain forward hook replacing the output of the ``call``-th call (0-based) with a constant."""
    count = [0]

    def hook(mod, args, out):
        count[0] += 1
        if count[0] - 1 == call:
            return torch.full_like(out, value)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


WEIGHTS = {
    "openvla": ["language_model.lm_head.weight", "language_model.model.layers.2.mlp.down_proj.weight"],
    "pi0": ["model.vlm.language_model.layers.0.mlp.down_proj.weight", "model.dit.layers.1.mlp.down_proj.weight",
            "action_out_proj.weight"],
    "pi0-fast": ["lm_head.weight", "model.language_model.layers.1.mlp.down_proj.weight"],
}


@pytest.mark.parametrize("family,weight", [(f, w) for f, ws in WEIGHTS.items() for w in ws])
def test_nan_weights_raise_instead_of_an_action(models, images, family, weight):
    vla = models[family]
    with poisoned(vla._module.get_parameter(weight)):
        with pytest.raises(ModelOutputError, match="NaN or infinite"):
            predict(vla, images)
    assert np.all(np.isfinite(predict(vla, images)))  # restored


@pytest.mark.parametrize("family", ["openvla", "pi0-fast"])
@pytest.mark.parametrize("value,message", [(0.0, "are equal"), (float("nan"), "NaN or infinite")])
def test_constant_or_nan_logits_at_a_later_decode_step_raise(models, images, family, value, message):
    vla = models[family]
    head = vla._module.language_model.lm_head if family == "openvla" else vla._module.lm_head
    kwargs = {"stop_at_eos": False} if family == "pi0-fast" else {}
    with output_hook(head, 3, value):
        with pytest.raises(ModelOutputError, match=f"forward 3.*{message}|{message}.*forward 3"):
            predict(vla, images, **kwargs)


def test_pi0_non_finite_flow_velocity_raises(models, images):
    vla = models["pi0"]
    with output_hook(vla._module.action_out_proj, 2, float("inf")):
        with pytest.raises(ModelOutputError, match="denoising step 2"):
            predict(vla, images)


def test_saturated_steering_edit_raises(models, images):
    """An edit that saturates the residual (every logit equal) is refused, also inside a trace."""
    vla = models["openvla"]
    with pytest.raises(ModelOutputError, match="are equal"):
        with vla.predict_action(images["a"], INSTRUCTION) as tracer:
            for step in tracer.iter[:7]:
                if step == 4:
                    vla.lm_head.output[...] = 1.0
                else:
                    vla.lm_head.output.save()


# -- modules that never run -----------------------------------------------------------------------------------

def _containers(module: nn.Module) -> set[str]:
    return {n for n, m in module.named_modules() if isinstance(m, (nn.ModuleList, nn.ModuleDict))}


@pytest.mark.parametrize("family", FAMILIES)
def test_documented_never_run_modules_are_exactly_those_that_never_run(models, images, family):
    vla = models[family]
    module = vla._module
    containers = _containers(module)
    ran: set[str] = set()
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: ran.add(n)) for n, m in module.named_modules()
               if n not in containers]
    try:
        predict(vla, images)
    finally:
        for handle in handles:
            handle.remove()
    measured = {n for n, _ in module.named_modules() if n and n not in containers and n not in ran}
    documented = set()
    for path, subtree, why in vla.never_run():
        assert why
        documented.add(path)
        if subtree:
            documented |= {n for n, _ in module.named_modules() if n.startswith(path + ".")}
    assert measured == documented - containers
    assert bool(measured) == (family != "pi0-fast")


@pytest.mark.parametrize("family,reach,name", [
    ("openvla", lambda v: v.vision_backbone.featurizer.encoder.layer[-1], "featurizer.encoder.layer.2"),
    ("openvla", lambda v: v.vision_backbone.fused_featurizer.head, "fused_featurizer.head"),
    ("openvla", lambda v: v.vision_backbone.featurizer.layernorm, "featurizer.layernorm"),
    ("pi0", lambda v: v.lm_head, "unembed"),
])
def test_reading_a_module_that_never_runs_names_it(models, images, family, reach, name):
    vla = models[family]
    with pytest.raises(InputError, match=rf"{name} is not used by {family}"):
        if family == "openvla":
            with vla.predict_action(images["a"], INSTRUCTION) as tracer:  # noqa: F841 (the target makes it a trace)
                reach(vla).output.save()
        else:
            with vla.predict_action({"base": images["a"], "wrist": images["b"]}, INSTRUCTION, np.zeros(7)) as tracer:  # noqa: F841
                reach(vla).output.save()
    assert np.all(np.isfinite(predict(vla, images)))  # the model still works


# -- checkpoints ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_shard_is_named(models, family, tmp_path):
    models[family].save_pretrained(tmp_path)
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=shard.name):
        nv.load(family, tmp_path, dispatch=True)


@pytest.mark.parametrize("family,overrides", [
    ("openvla", {"text": {"hidden_act": "swishy"}}),
    ("openvla", {"featurizer": {"hidden_act": "swishy"}}),
    ("pi0", {"expert": {"hidden_act": "swishy"}}),
    ("pi0-fast", {"vision": {"hidden_act": "swishy"}}),
])
def test_unsupported_hidden_act_is_refused(family, overrides):
    with pytest.raises(CheckpointError, match="hidden_act='swishy'"):
        nv.tiny(family, **overrides)


def test_ignored_gemma_hidden_activation_is_refused():
    with pytest.raises(CheckpointError, match="hidden_activation='relu'"):
        nv.tiny("pi0-fast", text={"hidden_activation": "relu"})


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def openvla_folder(tiny_openvla, tmp_path_factory):
    folder = tmp_path_factory.mktemp("openvla")
    tiny_openvla.save_pretrained(folder)
    return folder


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "checkpoint"
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["text_config"].update(hidden_act="swishy"), "hidden_act='swishy'"),
    (lambda c: c.update(timm_override_act_layers=["quick_gelu", None]), "timm_override_act_layers"),
])
def test_checkpoint_activation_settings_are_checked(openvla_folder, tmp_path, edit, message):
    folder = _copy(openvla_folder, tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        nv.load("openvla", folder)


def _action(config):
    return config["norm_stats"]["tiny"]["action"]


@pytest.mark.parametrize("edit,message", [
    (lambda c: _action(c).update(q01=[0.1] * 7, q99=[0.0] * 7), r"q01 > q99 in dimension\(s\) \[0, 1"),
    (lambda c: _action(c).update(q99=[0.1] * 6), "q01 has 7 values but q99 has 6"),
    (lambda c: _action(c).update(q01=["-0.1"] * 7), "numbers only"),
    (lambda c: _action(c).update(q01=[True] * 7), "numbers only"),
    (lambda c: _action(c).update(mask=[1, 1, 1, 1, 1, 1, 0]), "list of booleans"),
    (lambda c: _action(c).update(mask=[True] * 6), "6 entries for 7"),
    (lambda c: _action(c).pop("q99"), "must hold q01 and q99"),
])
def test_norm_stats_are_validated_on_load(openvla_folder, tmp_path, edit, message):
    folder = _copy(openvla_folder, tmp_path)
    _edit_config(folder, edit)
    with pytest.raises(CheckpointError, match=message):
        nv.load("openvla", folder)


@pytest.mark.parametrize("family,overrides", [
    ("openvla", {}),
    ("pi0", {"text": {"max_position_embeddings": 96}}),
    ("pi0-fast", {"text": {"max_position_embeddings": 96}}),
])
def test_instruction_past_max_position_embeddings_is_refused(images, family, overrides):
    vla = nv.tiny(family, **overrides)
    long = " ".join(["pick up the black bowl and put it on the plate"] * 60)
    with pytest.raises(InputError, match="max_position_embeddings"):
        predict(vla, images, instruction=long)
    assert predict(vla, images).shape[-1] == vla.action_dim  # a normal instruction still fits
