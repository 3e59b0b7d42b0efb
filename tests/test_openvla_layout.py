"""Our OpenVLA against the ORIGINAL implementation (openvla/openvla @ c8f03f4, timm 0.9.16, transformers 4.40.1).

The reference data in tests/data was produced by running the original code (see tests/data/README.md and
make_openvla_reference.py): the full-size parameter list of openvla-7b built on the meta device, and a tiny
checkpoint saved by the original ``save_pretrained`` with its inputs and outputs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import nnsight_vla as nv
from nnsight_vla.models.openvla import original_state_dict
from nnsight_vla.models.tokenizer import build_llama_style_tokenizer

DATA = Path(__file__).parent / "data"
REFERENCE = DATA / "openvla_tiny_reference"


def checkpoint_folder(tmp_path: Path, source: Path, config: Path | None = None) -> Path:
    """A copy of a reference folder plus a tokenizer (the layout under test does not involve the tokenizer)."""
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    if config is not None:
        shutil.copy(config, folder / "config.json")
    build_llama_style_tokenizer().save_pretrained(str(folder))
    return folder


def test_full_size_meta_build_has_the_published_names_and_shapes(tmp_path):
    """openvla-7b built on the meta device (no memory) yields exactly the original parameter names and shapes."""
    reference = json.loads((DATA / "openvla_7b_parameters.json").read_text())["parameters"]
    folder = tmp_path / "openvla-7b"
    folder.mkdir()
    shutil.copy(DATA / "openvla_7b_config.json", folder / "config.json")
    shutil.copy(DATA / "openvla_7b_preprocessor_config.json", folder / "preprocessor_config.json")
    build_llama_style_tokenizer().save_pretrained(str(folder))
    vla = nv.load("openvla", str(folder))
    assert not vla.dispatched
    assert all(p.is_meta for p in vla._module.parameters())
    ours = {name: list(t.shape) for name, t in original_state_dict(vla._module).items()}
    expected = {name: (entry["shape"] if isinstance(entry, dict) else entry) for name, entry in reference.items()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert ours == expected
    assert (vla.num_layers, vla.d_model, vla.d_mlp, vla.vocab_size) == (32, 4096, 11008, 32064)
    assert list(vla.action_token_ids[[0, -1]]) == [31744, 31999]


def test_tiny_reference_checkpoint_reproduces_the_original_outputs(tmp_path):
    ref = np.load(REFERENCE / "reference.npz")
    vla = nv.load("openvla", str(checkpoint_folder(tmp_path, REFERENCE)), dispatch=True)
    model = vla._module
    # preprocessing: our PIL path reproduces the original torchvision transforms from preprocessor_config.json
    for suffix, image in (("", ref["image"]), ("2", ref["image2"])):
        pixels = vla.image_processor(image).unsqueeze(0)
        np.testing.assert_allclose(pixels.numpy(), ref[f"pixel_values{suffix}"], atol=1e-6)
    with torch.no_grad():
        pixels = torch.from_numpy(ref["pixel_values"])
        dino, siglip = torch.split(pixels, [3, 3], dim=1)
        from nnsight_vla.models.openvla import _penultimate_patches

        torch.testing.assert_close(_penultimate_patches(model.vision_backbone.featurizer, dino),
                                   torch.from_numpy(ref["featurizer_patches"]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_penultimate_patches(model.vision_backbone.fused_featurizer, siglip),
                                   torch.from_numpy(ref["fused_featurizer_patches"]), rtol=1e-4, atol=1e-5)
        features = model.vision_backbone(pixels)
        torch.testing.assert_close(features, torch.from_numpy(ref["patch_features"]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.projector(features), torch.from_numpy(ref["projector_features"]),
                                   rtol=1e-4, atol=1e-5)
        out = model(input_ids=torch.from_numpy(ref["input_ids"]), pixel_values=pixels)
        torch.testing.assert_close(out.logits, torch.from_numpy(ref["logits"]), rtol=1e-4, atol=1e-4)
    # greedy decoding and un-normalisation, for both images and both datasets
    for suffix in ("", "2"):
        pixels = torch.from_numpy(ref[f"pixel_values{suffix}"])
        ids = vla.greedy_action_tokens(torch.from_numpy(ref["input_ids"]), pixels, 7)
        np.testing.assert_array_equal(ids, ref[f"generated_ids{suffix}"])
        for key in ("tiny_masked", "tiny_unmasked"):
            np.testing.assert_allclose(vla.bins.decode(ids, key), ref[f"actions{suffix}_{key}"], rtol=1e-12)
    np.testing.assert_allclose(vla.bins.decode(ref["generated_ids"], False), ref["normalized_actions"])


def test_tiny_reference_round_trips_to_the_identical_files(tmp_path):
    """Saving what we loaded reproduces the original tensors bit for bit, under the original names."""
    from safetensors.torch import load_file

    vla = nv.load("openvla", str(checkpoint_folder(tmp_path, REFERENCE)), dispatch=True)
    vla.save_pretrained(tmp_path / "resaved")
    original = {}
    for shard in REFERENCE.glob("model-*.safetensors"):
        original.update(load_file(shard))
    resaved = {}
    for shard in (tmp_path / "resaved").glob("model*.safetensors"):
        resaved.update(load_file(shard))
    assert set(original) == set(resaved)
    for name, tensor in original.items():
        torch.testing.assert_close(resaved[name], tensor, rtol=0, atol=0, msg=name)


def test_traced_predict_action_on_the_reference_model(tmp_path):
    """The real loader + the traced path: a steered run equals a plain hook, on the original's weights."""
    ref = np.load(REFERENCE / "reference.npz")
    vla = nv.load("openvla", str(checkpoint_folder(tmp_path, REFERENCE)), dispatch=True)
    layer, neurons = 1, [2, 5, 9]
    down = vla._module.language_model.model.layers[layer].mlp.down_proj

    def hook(module, args):
        x = args[0].clone()
        x[..., neurons] = 6.0
        return (x,)

    handle = down.register_forward_pre_hook(hook)
    expected = vla.predict_action(ref["image"], "pick up the cube", unnorm_key="tiny_masked")
    handle.remove()
    with vla.predict_action(ref["image"], "pick up the cube", unnorm_key="tiny_masked") as tracer:
        for _ in tracer.iter[:7]:
            vla.layers[layer].mlp.act.output[..., neurons] = 6.0
        steered = tracer.result.save()
    plain = vla.predict_action(ref["image"], "pick up the cube", unnorm_key="tiny_masked")
    np.testing.assert_array_equal(steered, expected)
    assert not np.array_equal(steered, plain)


@pytest.mark.parametrize("missing", ["vision_backbone.fused_featurizer.attn_pool.kv.weight", "projector.fc3.bias"])
def test_checkpoint_missing_a_tensor_is_named(tmp_path, missing):
    from safetensors.torch import load_file, save_file

    from nnsight_vla.errors import CheckpointError

    folder = checkpoint_folder(tmp_path, REFERENCE)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"].pop(missing)
    tensors = load_file(shard)
    del tensors[missing]
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        nv.load("openvla", str(folder), dispatch=True)
