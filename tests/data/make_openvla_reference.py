"""Regenerate the OpenVLA reference test data from the ORIGINAL implementation.

This script is NOT part of the test suite and does NOT run in the project venv: it imports
OpenVLA's own Hugging Face code (``prismatic/extern/hf/*.py`` of github.com/openvla/openvla),
which needs timm 0.9.x (which imports torchvision) and transformers 4.40.1.

Reference venv (outside the repo), as used to produce the committed files:

    python3.11 -m venv /work/venvs/ref
    /work/venvs/ref/bin/pip install torch==2.14.1 torchvision==0.29.1 timm==0.9.16 \
        transformers==4.40.1 tokenizers==0.19.1 safetensors numpy pillow accelerate==0.29.3

Rerun (from the repository root), pointing at a clone (or bare mirror) of openvla/openvla:

    /work/venvs/ref/bin/python tests/data/make_openvla_reference.py \
        --openvla-git /path/to/openvla.git --rev c8f03f48af692657d3060c19588038c7220e9af9

The three original files are exported with ``git show`` into a temporary folder and imported
from there; no original code is copied into this repository.  Outputs (all deterministic,
byte-identical on rerun):

    tests/data/openvla_7b_parameters.json           full-size parameter names/shapes/dtypes (meta device)
    tests/data/openvla_7b_config.json               reconstructed published config.json (norm_stats abbreviated)
    tests/data/openvla_7b_preprocessor_config.json  reconstructed published preprocessor_config.json
    tests/data/openvla_tiny_reference/              tiny checkpoint in the original layout + reference NPZ

See tests/data/README.md for what each file holds and how it was produced.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ORIGINAL_FILES = ("configuration_prismatic.py", "modeling_prismatic.py", "processing_prismatic.py")
EXPECTED_VERSIONS = {"timm": "0.9.16", "transformers": "4.40.1", "tokenizers": "0.19.1"}

# --- the real openvla-7b construction (mirrors vla-scripts/extern/convert_openvla_weights_to_hf.py) ---
REAL_MODEL_KW = dict(
    vision_backbone_id="dinosiglip-vit-so-224px",
    llm_backbone_id="llama2-7b-pure",
    arch_specifier="no-align+fused-gelu-mlp",
    image_resize_strategy="resize-naive",
    llm_max_length=2048,
)
AUTO_MAP_MODEL = {
    "AutoConfig": "configuration_prismatic.OpenVLAConfig",
    "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
}
AUTO_MAP_PROCESSOR = {
    "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
    "AutoProcessor": "processing_prismatic.PrismaticProcessor",
}

# Real per-dataset statistics found in public code (see README for provenance).  Only two of the
# ~25 datasets of the published config are reproduced; bridge_orig's "proprio" block is unknown
# and therefore omitted (predict_action never reads it).
REAL_NORM_STATS = {
    "bridge_orig": {
        "action": {
            "mask": [True, True, True, True, True, True, False],
            "max": [0.41691166162490845, 0.25864794850349426, 0.21218234300613403, 3.122201919555664,
                    1.8618112802505493, 6.280478477478027, 1.0],
            "mean": [0.0002334194869035855, 0.00013004911306779832, -0.00012762474943883717,
                     -0.0001556558854645118, -0.0004039328487124294, 0.00023557482927571982, 0.5764579176902771],
            "min": [-0.4007510244846344, -0.13874775171279907, -0.22553899884223938, -3.2010786533355713,
                    -1.8618112802505493, -6.279075622558594, 0.0],
            "q01": [-0.02872725307941437, -0.04170349963009357, -0.026093858778476715, -0.08092105075716972,
                    -0.09288699507713317, -0.20718276381492615, 0.0],
            "q99": [0.028309678435325586, 0.040855254605412394, 0.040161586627364146, 0.08192047759890528,
                    0.07792850524187081, 0.20382574498653397, 1.0],
            "std": [0.009765930473804474, 0.013689135201275349, 0.012667362578213215, 0.028534092009067535,
                    0.030637972056865692, 0.07691419124603271, 0.4973701536655426],
        },
        "num_trajectories": 60064,
        "num_transitions": 2135463,
    },
    "fractal20220817_data": {
        "action": {
            "mask": [True, True, True, True, True, True, False],
            "max": [2.9984593391418457, 22.09052848815918, 2.7507524490356445, 1.570636510848999,
                    1.5321086645126343, 1.5691522359848022, 1.0],
            "mean": [0.006987582892179489, 0.006265917327255011, -0.01262515690177679, 0.04333311319351196,
                     -0.005756212864071131, 0.0009130256366916001, 0.5354204773902893],
            "min": [-2.0204520225524902, -5.497899532318115, -2.031663417816162, -1.569917917251587,
                    -1.569892168045044, -1.570419430732727, 0.0],
            "q01": [-0.22453527510166169, -0.14820013284683228, -0.231589707583189, -0.3517994859814644,
                    -0.4193011274933815, -0.43643461108207704, 0.0],
            "q99": [0.17824687153100965, 0.14938379630446405, 0.21842354819178575, 0.5892666035890578,
                    0.35272657424211445, 0.44796681255102094, 1.0],
            "std": [0.0692116990685463, 0.05970962345600128, 0.07353084534406662, 0.15610496699810028,
                    0.13164450228214264, 0.14593800902366638, 0.497110515832901],
        },
        "num_trajectories": 87212,
        "num_transitions": 3786400,
        "proprio": {k: [0.0] * 7 for k in ("max", "mean", "min", "q01", "q99", "std")},
    },
}

# --- the tiny model ---
SEED = 20240613  # OpenVLA release date; any fixed value works
TINY_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px
TINY_TIMM_KWARGS = [  # extra timm.create_model kwargs, aligned with config.timm_model_ids
    {"embed_dim": 32, "depth": 3, "num_heads": 2},  # vit_large_patch14_reg4_dinov2 family
    {"embed_dim": 40, "depth": 3, "num_heads": 2},  # vit_so400m_patch14_siglip_224 family (mlp_ratio 3.7362 kept)
]
TINY_REAL_VOCAB = 1024  # "real" vocabulary; 256 action tokens are ids 768..1023
TINY_PAD_TO = 64
TINY_TEXT_CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": TINY_REAL_VOCAB + TINY_PAD_TO,  # 1088, like 32000 + 64 = 32064
    "pad_token_id": TINY_REAL_VOCAB,  # like <PAD> = 32000
    "torch_dtype": "float32",
}
# Tiny stand-in for the Llama "empty" token 29871 (out of range for a 1088-row vocabulary).
TINY_EMPTY_TOKEN = 29871 % TINY_REAL_VOCAB  # = 175
ACTION_ROW_GAIN = 2.0  # lm_head rows of the 256 action tokens get this std gain (so greedy decoding picks them)
TINY_NORM_STATS = {
    "tiny_masked": {  # gripper excluded from un-normalisation, like bridge_orig
        "action": {
            "mask": [True, True, True, True, True, True, False],
            "q01": [-0.03, -0.04, -0.025, -0.08, -0.09, -0.2, 0.0],
            "q99": [0.028, 0.041, 0.04, 0.082, 0.078, 0.2, 1.0],
        },
    },
    "tiny_unmasked": {  # no "mask" key: every dimension (gripper too) is un-normalised
        "action": {
            "q01": [-0.5, -1.0, -0.25, -2.0, -0.1, -3.0, 0.0],
            "q99": [0.5, 2.0, 0.75, 1.0, 0.3, 3.0, 1.0],
        },
    },
}
PROMPT_IDS = [1, 312, 45, 611, 90, 23, 400, 17]  # BOS + 7 ids < 768; does NOT end in TINY_EMPTY_TOKEN


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file atomically (temp file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj, indent=2) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=False) + "\n").encode())


def deterministic_npz(arrays: dict) -> bytes:
    """An .npz readable by np.load, but byte-reproducible (fixed zip timestamps, fixed order)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            inner = io.BytesIO()
            np.lib.format.write_array(inner, arr, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, inner.getvalue())
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_original(git_dir: str, rev: str, dest: Path) -> dict:
    """`git show REV:prismatic/extern/hf/<file>` into dest/prismatic_hf_ref/ (a throw-away package)."""
    pkg = dest / "prismatic_hf_ref"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    full_rev = subprocess.run(["git", "-C", git_dir, "rev-parse", rev], check=True, capture_output=True,
                              text=True).stdout.strip()
    hashes = {}
    for name in ORIGINAL_FILES:
        blob = subprocess.run(["git", "-C", git_dir, "show", f"{full_rev}:prismatic/extern/hf/{name}"],
                              check=True, capture_output=True).stdout
        (pkg / name).write_bytes(blob)
        hashes[name] = sha256(blob)
    return {"commit": full_rev, "sha256": hashes}


@contextmanager
def default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextmanager
def timm_overrides(per_model_kwargs: dict):
    """Inject extra kwargs into timm.create_model for the given model ids (keeps Prismatic's wiring)."""
    import timm

    original = timm.create_model

    def create_model(model_name, *args, **kwargs):
        kwargs.update(per_model_kwargs.get(model_name, {}))
        return original(model_name, *args, **kwargs)

    timm.create_model = create_model
    try:
        yield
    finally:
        timm.create_model = original


def load_original(src_dir: Path):
    sys.path.insert(0, str(src_dir))
    conf = importlib.import_module("prismatic_hf_ref.configuration_prismatic")
    model = importlib.import_module("prismatic_hf_ref.modeling_prismatic")
    proc = importlib.import_module("prismatic_hf_ref.processing_prismatic")
    return conf, model, proc


def check_versions() -> dict:
    import PIL
    import safetensors
    import timm
    import tokenizers
    import torch
    import torchvision
    import transformers

    got = {"timm": timm.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    for k, v in EXPECTED_VERSIONS.items():
        if got[k] != v:
            raise SystemExit(f"{k}=={got[k]} found, the reference needs {k}=={v} (see the module docstring)")
    got.update(torch=torch.__version__, torchvision=torchvision.__version__, numpy=np.__version__,
               pillow=PIL.__version__, safetensors=safetensors.__version__,
               python=sys.version.split()[0])
    return got


# ----------------------------------------------------------------------------------------------
# 1. full-size parameter list + reconstructed config.json / preprocessor_config.json
# ----------------------------------------------------------------------------------------------
def real_config(conf_mod):
    """OpenVLAConfig exactly as convert_openvla_weights_to_hf.py builds it (norm_stats abbreviated)."""
    import torch

    with default_dtype(torch.bfloat16):
        cfg = conf_mod.OpenVLAConfig(torch_dtype=torch.bfloat16, norm_stats=REAL_NORM_STATS, **REAL_MODEL_KW)
        cfg.text_config.vocab_size += cfg.pad_to_multiple_of  # 32000 -> 32064
        cfg.text_config.pad_token_id = cfg.pad_token_id
        cfg.text_config.torch_dtype = torch.bfloat16
    cfg.architectures = ["OpenVLAForActionPrediction"]
    cfg.auto_map = dict(AUTO_MAP_MODEL)
    return cfg


def full_size_outputs(conf_mod, model_mod, proc_mod, provenance, versions, out_dir: Path) -> dict:
    import timm
    import torch
    from accelerate import init_empty_weights
    from transformers.modeling_utils import shard_checkpoint

    cfg = real_config(conf_mod)
    config_json = cfg.to_json_string(use_diff=True)
    atomic_write_bytes(out_dir / "openvla_7b_config.json", config_json.encode())

    # Build on the meta device (no memory), cast to bf16 as the conversion script does before saving.
    with init_empty_weights():
        model = model_mod.OpenVLAForActionPrediction(cfg)
    model.to(torch.bfloat16)
    sd = model.state_dict()
    assert not any(k.endswith(".gamma") for k in sd), "LayerScale gamma must be saved as scale_factor"
    params = {k: list(v.shape) for k, v in sd.items()}
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    n_params = int(sum(v.numel() for v in sd.values()))

    # Predict the published shard index: save_pretrained(max_shard_size="7GB") uses shard_checkpoint in
    # state_dict order; meta tensors share one fake storage, so feed 1-element expanded stand-ins.
    fakes = {k: torch.empty(1, dtype=v.dtype).expand(*v.shape) for k, v in sd.items()}
    _, index = shard_checkpoint(fakes, max_shard_size="7GB", weights_name="model.safetensors")

    unused = sorted(
        [k for k in params if k.startswith("vision_backbone.featurizer.blocks.23.")]
        + [k for k in params if k.startswith("vision_backbone.fused_featurizer.blocks.26.")]
        + [k for k in params if k.startswith("vision_backbone.fused_featurizer.attn_pool.")]
        + [k for k in params if k.startswith("vision_backbone.featurizer.norm.")]
        + [k for k in params if k.startswith("vision_backbone.fused_featurizer.norm.")]
    )
    doc = {
        "source": (
            "Derived, not copied: OpenVLAForActionPrediction from the ORIGINAL prismatic/extern/hf code "
            f"(github.com/openvla/openvla @ {provenance['commit']}) built with accelerate.init_empty_weights "
            "(meta device) from the openvla-7b configuration as vla-scripts/extern/convert_openvla_weights_to_hf.py "
            "creates it (dinosiglip-vit-so-224px, llama2-7b-pure, no-align+fused-gelu-mlp, resize-naive, "
            "text_config vocab 32000+64=32064, pad 32000), then .to(bfloat16) as that script does before "
            "save_pretrained(max_shard_size='7GB'); keys/shapes are model.state_dict(). LayerScale 'gamma' is "
            "already renamed 'scale_factor' by ls_apply_patch (what is saved). Versions: "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + ". Comparison with the published checkpoint: the openvla/openvla-7b model.safetensors.index.json "
            "(or a full key listing) was NOT found in the searchable public-code corpus, so no full comparison "
            "was possible. Independent public converters that read the real checkpoint by name (a GGUF mmproj "
            "converter, tenstorrent tt-metal's OpenVLA port, an MLX port, OFT key converters) use exactly these "
            "names: vision_backbone.featurizer.{cls_token, reg_token [1,4,1024], pos_embed [1,256,1024], "
            "patch_embed.proj.*, norm.*, blocks.N.{norm1,attn.qkv,attn.proj,ls1.scale_factor,ls2.scale_factor,"
            "norm2,mlp.fc1,mlp.fc2}.*}, vision_backbone.fused_featurizer.{patch_embed.proj.*, pos_embed "
            "[1,256,1152], norm.*, blocks.N.*, attn_pool.{latent,q,kv,proj,mlp.fc1,mlp.fc2}}, projector.fc1..fc3.*, "
            "language_model.lm_head.weight; the published checkpoint has three shards "
            "model-0000{1,2,3}-of-00003.safetensors, consistent with predicted_index below, and two public notes "
            "about checkpoints of exactly this architecture (a merged LoRA fine-tune of openvla/openvla-7b@47a0ec7, "
            "whose index was compared name-by-name with another merge; OmniVLA's full weights) report "
            "metadata.total_size 15082474368 bytes, equal to predicted_index.metadata.total_size "
            "(7,541,237,184 bf16 parameters)."
        ),
        "original_code": provenance,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "num_tensors": len(params),
        "num_parameters": n_params,
        "unused_in_forward": {
            "note": "present and saved, but never used by predict_action/forward: the featurizers return the "
                    "output of the SECOND-TO-LAST block (get_intermediate_layers n={depth-2}, norm=False), so the "
                    "last block still runs but its output is discarded, the final norms are skipped and SigLIP's "
                    "MAP head (attn_pool) is never called",
            "keys": unused,
        },
        "parameters": params,
        "predicted_index": index,
    }
    atomic_write_json(out_dir / "openvla_7b_parameters.json", doc, indent=1)

    # preprocessor_config.json: same recipe as the conversion script, including its global bf16 default
    # dtype (this is what rounds the ImageNet mean/std in tvf_normalize_params to bf16 values).
    with default_dtype(torch.bfloat16):
        input_sizes, interpolations, means, stds = [], [], [], []
        for idx, timm_id in enumerate(cfg.timm_model_ids):
            with init_empty_weights():
                backbone = timm.create_model(timm_id, pretrained=False, num_classes=0,
                                             img_size=cfg.image_sizes[idx], act_layer=cfg.timm_override_act_layers[idx])
            data_cfg = timm.data.resolve_model_data_config(backbone)
            input_sizes.append((3, cfg.image_sizes[idx], cfg.image_sizes[idx]))
            interpolations.append(data_cfg["interpolation"])
            means.append(data_cfg["mean"])
            stds.append(data_cfg["std"])
        improc = proc_mod.PrismaticImageProcessor(
            use_fused_vision_backbone=cfg.use_fused_vision_backbone, image_resize_strategy=cfg.image_resize_strategy,
            input_sizes=input_sizes, interpolations=interpolations, means=means, stds=stds)
    improc.auto_map = dict(AUTO_MAP_PROCESSOR)
    improc._set_processor_class("PrismaticProcessor")
    atomic_write_bytes(out_dir / "openvla_7b_preprocessor_config.json", improc.to_json_string().encode())
    return {"num_tensors": len(params), "num_parameters": n_params, "shards": sorted(set(index["weight_map"].values()))}


# ----------------------------------------------------------------------------------------------
# 2. tiny checkpoint + reference inputs/outputs
# ----------------------------------------------------------------------------------------------
def tiny_config(conf_mod):
    cfg = conf_mod.OpenVLAConfig(
        **REAL_MODEL_KW,
        use_fused_vision_backbone=True,
        text_config=dict(TINY_TEXT_CONFIG),
        pad_token_id=TINY_REAL_VOCAB,
        pad_to_multiple_of=TINY_PAD_TO,
        n_action_bins=256,
        norm_stats=TINY_NORM_STATS,
        torch_dtype="float32",
        # PretrainedConfig stores extra kwargs as attributes, after PrismaticConfig derived its own:
        image_sizes=[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE],
        timm_model_kwargs=TINY_TIMM_KWARGS,
        architectures=["OpenVLAForActionPrediction"],
        auto_map=dict(AUTO_MAP_MODEL),
    )
    assert cfg.image_sizes == [TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]
    return cfg


def randomize_(model, seed: int) -> None:
    """Seeded, deliberately non-trivial values (no ones / zeros / 1e-5) so a wrong name mapping cannot pass."""
    import torch

    g = torch.Generator().manual_seed(seed)
    norm_weight_names = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, torch.nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
            norm_weight_names.add(f"{mname}.weight")
    lm_head = "language_model.lm_head.weight"
    with torch.no_grad():
        for name, p in model.named_parameters():  # deterministic module order
            n = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("scale_factor"):  # LayerScale
                v = 0.5 + torch.rand(p.shape, generator=g)
            elif name in norm_weight_names:
                v = 1.0 + 0.2 * n
            elif name.endswith("bias"):
                v = 0.1 * n
            elif name.endswith(("cls_token", "reg_token", "latent")) or name.endswith("embed_tokens.weight"):
                v = n
            elif name.endswith("pos_embed"):
                v = 0.5 * n
            elif p.dim() >= 2:  # Linear / Conv2d weights: unit-variance activations
                v = n / float(np.sqrt(np.prod(p.shape[1:])))
            else:
                raise AssertionError(f"unhandled parameter {name}")
            if name == lm_head:
                v[TINY_REAL_VOCAB - 256:TINY_REAL_VOCAB] *= ACTION_ROW_GAIN
            p.copy_(v)


def bf16_round(values):
    import torch

    return torch.tensor(values, dtype=torch.bfloat16).float().numpy().tolist()


def tiny_preprocessor_json(proc_mod) -> str:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    s = TINY_IMAGE_SIZE
    improc = proc_mod.PrismaticImageProcessor(
        use_fused_vision_backbone=True, image_resize_strategy="resize-naive",
        input_sizes=[(3, s, s), (3, s, s)], interpolations=["bicubic", "bicubic"],
        means=[IMAGENET_DEFAULT_MEAN, (0.5, 0.5, 0.5)], stds=[IMAGENET_DEFAULT_STD, (0.5, 0.5, 0.5)])
    # Same rounding as the published file (there: a side effect of the conversion's bf16 default dtype).
    for params in improc.tvf_normalize_params:
        params["mean"], params["std"] = bf16_round(params["mean"]), bf16_round(params["std"])
    improc.auto_map = dict(AUTO_MAP_PROCESSOR)
    improc._set_processor_class("PrismaticProcessor")
    return improc.to_json_string()


def patched_predict_action(model_mod, model):
    """The ORIGINAL predict_action source, only its literal 29871 replaced by the tiny empty-token id."""
    src = textwrap.dedent(inspect.getsource(model_mod.OpenVLAForActionPrediction.predict_action))
    assert src.count("29871") == 2, "predict_action changed upstream; review the tiny empty-token patch"
    src = src.replace("29871", str(TINY_EMPTY_TOKEN))
    namespace = dict(vars(model_mod))
    exec(compile(src, "<predict_action, tiny empty token>", "exec"), namespace)
    return types.MethodType(namespace["predict_action"], model)


def make_images():
    rng = np.random.default_rng(SEED)

    def image(h, w):  # smooth structure + noise, so resizing and normalisation both matter
        yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
        base = np.stack([255 * xx, 255 * yy, 255 * (1 - xx) * yy], axis=-1)
        return np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)

    return image(40, 50), image(73, 61)  # up-sampled and down-sampled to 56 x 56; non-square


def tiny_outputs(conf_mod, model_mod, proc_mod, provenance, versions, out_dir: Path) -> dict:
    import torch
    from PIL import Image

    torch.manual_seed(SEED)
    cfg = tiny_config(conf_mod)
    timm_kwargs = dict(zip(cfg.timm_model_ids, cfg.timm_model_kwargs))
    with timm_overrides(timm_kwargs):
        model = model_mod.OpenVLAForActionPrediction(cfg)
    randomize_(model, SEED)
    model.eval()

    total_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    final = out_dir / "openvla_tiny_reference"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".openvla_tiny_reference."))
    os.chmod(tmp, 0o755)
    try:
        # Two shards, named and indexed exactly as HF save_pretrained does it (transformers 4.40.1).
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=int(total_bytes * 0.6))
        shards = sorted(p.name for p in tmp.glob("model-*.safetensors"))
        assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], shards
        (tmp / "preprocessor_config.json").write_text(tiny_preprocessor_json(proc_mod))

        # Reload through the original code paths (checks the files, and uses what a user would get).
        improc = proc_mod.PrismaticImageProcessor.from_pretrained(str(tmp))
        assert improc.tvf_normalize_params[0]["mean"] == bf16_round(list((0.485, 0.456, 0.406))), \
            "tvf_normalize_params from the JSON must win over the ones recomputed from means/stds"
        with timm_overrides(timm_kwargs):
            reloaded = model_mod.OpenVLAForActionPrediction.from_pretrained(str(tmp))
        reloaded.eval()
        for k, v in model.state_dict().items():
            assert torch.equal(v, reloaded.state_dict()[k]), k
        model = reloaded

        arrays, info = run_reference(model, model_mod, improc, Image)
        arrays_bytes = deterministic_npz(arrays)
        (tmp / "reference.npz").write_bytes(arrays_bytes)
        info.update(
            original_code=provenance, versions=versions, seed=SEED,
            tiny_dims={"image_size": TINY_IMAGE_SIZE, "timm_model_kwargs": TINY_TIMM_KWARGS,
                       "text_config": TINY_TEXT_CONFIG, "action_row_gain": ACTION_ROW_GAIN},
            tensor_shapes={k: list(v.shape) for k, v in model.state_dict().items()},
            unused_in_forward_prefixes=unused_prefixes(model),
        )
        (tmp / "reference_info.json").write_text(json.dumps(info, indent=1) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"files": sorted(p.name for p in final.iterdir()),
            "bytes": sum(p.stat().st_size for p in final.iterdir())}


def unused_prefixes(model) -> list:
    """Parameters that exist (and are saved) but never reach the output (see README)."""
    vb = model.vision_backbone
    return [f"vision_backbone.featurizer.blocks.{len(vb.featurizer.blocks) - 1}.",
            f"vision_backbone.fused_featurizer.blocks.{len(vb.fused_featurizer.blocks) - 1}.",
            "vision_backbone.featurizer.norm.", "vision_backbone.fused_featurizer.norm.",
            "vision_backbone.fused_featurizer.attn_pool."]


def check_unused_parameters(model, arrays) -> None:
    """Scramble every 'unused' parameter: the logits must not move at all."""
    import torch

    prefixes = unused_prefixes(model)
    saved = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(tuple(prefixes)):
                saved[name] = p.clone()
                p.add_(torch.randn_like(p) * 10)
        logits = model(input_ids=torch.from_numpy(arrays["input_ids"]),
                       pixel_values=torch.from_numpy(arrays["pixel_values"])).logits
        for name, value in saved.items():
            dict(model.named_parameters())[name].copy_(value)
    assert saved and torch.equal(logits, torch.from_numpy(arrays["logits"])), "an 'unused' parameter is used"


def run_reference(model, model_mod, improc, Image):
    import torch

    img1, img2 = make_images()
    pv1 = improc(Image.fromarray(img1))["pixel_values"]
    pv2 = improc(Image.fromarray(img2))["pixel_values"]
    assert pv1.dtype == np.float32 and pv1.shape == (1, 6, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)

    predict_action = patched_predict_action(model_mod, model)
    calls = []
    original_generate = model.generate

    def recording_generate(*args, **kwargs):  # keep predict_action's own call, just observe it
        out = original_generate(*args, **kwargs, output_logits=True, return_dict_in_generate=True)
        calls.append({"input_ids": args[0].clone(), "sequences": out.sequences.clone(),
                      "step_logits": torch.cat(out.logits, dim=0).clone()})
        return out.sequences

    model.generate = recording_generate
    arrays = {"image": img1, "image2": img2, "pixel_values": pv1, "pixel_values2": pv2,
              "prompt_ids": np.array([PROMPT_IDS], dtype=np.int64)}
    actions, margins = {}, {}
    with torch.no_grad():
        for tag, pv in (("", pv1), ("2", pv2)):
            pv_t = torch.from_numpy(pv)
            feats_dino = model.vision_backbone.featurizer(pv_t[:, :3])
            feats_siglip = model.vision_backbone.fused_featurizer(pv_t[:, 3:])
            patch = model.vision_backbone(pv_t)
            proj = model.projector(patch)
            for key in TINY_NORM_STATS:
                calls.clear()
                act = predict_action(torch.tensor([PROMPT_IDS]), unnorm_key=key, pixel_values=pv_t, do_sample=False)
                (call,) = calls
                actions[f"actions{tag}_{key}"] = np.asarray(act, dtype=np.float64)
            ids = call["input_ids"]
            out = model(input_ids=ids, pixel_values=pv_t, output_hidden_states=True)
            gen = call["sequences"][0, ids.shape[1]:]
            top2 = call["step_logits"].topk(2, dim=-1).values
            margins[f"min_greedy_margin{tag}"] = float((top2[:, 0] - top2[:, 1]).min())
            assert gen.numel() == 7, "generation stopped early (EOS); pick another seed"
            assert torch.allclose(out.logits[0, -1], call["step_logits"][0], atol=1e-5)
            arrays.update({
                f"featurizer_patches{tag}": feats_dino.numpy(),
                f"fused_featurizer_patches{tag}": feats_siglip.numpy(),
                f"patch_features{tag}": patch.numpy(),
                f"projector_features{tag}": proj.numpy(),
                f"generated_ids{tag}": gen.numpy().astype(np.int64),
            })
            if tag == "":  # the bulky arrays only for the first image (keeps the folder small)
                arrays.update(logits=out.logits.numpy(), step_logits=call["step_logits"].numpy(),
                              lm_hidden_states=torch.stack(out.hidden_states).numpy())
            else:
                arrays[f"first_step_logits{tag}"] = call["step_logits"][0].numpy()
            arrays["input_ids"] = ids.numpy()
    model.generate = original_generate
    arrays.update(actions)
    assert np.array_equal(arrays["generated_ids"], arrays["step_logits"].argmax(-1)), "greedy = argmax per step"
    check_unused_parameters(model, arrays)

    # The decode, spelled out, must agree with the original predict_action's numbers.
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    for tag in ("", "2"):
        idx = np.clip(TINY_REAL_VOCAB - arrays[f"generated_ids{tag}"] - 1, 0, 254)
        arrays[f"normalized_actions{tag}"] = centers[idx]
    assert not np.array_equal(arrays["generated_ids"], arrays["generated_ids2"]), "the image does not matter"
    assert not np.allclose(arrays["step_logits"][0], arrays["first_step_logits2"], atol=1e-2), "image ignored"

    info = {
        "empty_token_id": TINY_EMPTY_TOKEN,
        "empty_token_note": "tiny stand-in for Llama's 29871; predict_action appended it to prompt_ids -> input_ids",
        "action_token_ids": [TINY_REAL_VOCAB - 256, TINY_REAL_VOCAB - 1],
        "decode": "idx = clip(1024 - token_id - 1, 0, 254); normalized = bin_centers[idx]; "
                  "action = where(mask, 0.5*(normalized+1)*(q99-q01)+q01, normalized)",
        "num_patches": (TINY_IMAGE_SIZE // 14) ** 2,
        "arrays": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for k, v in sorted(arrays.items())},
        "generated_ids": arrays["generated_ids"].tolist(),
        "generated_ids2": arrays["generated_ids2"].tolist(),
        "actions": {k: v.tolist() for k, v in actions.items()},
        "greedy_margins_note": "smallest top1-top2 logit gap over the 7 greedy steps (robustness of token checks)",
        **margins,
    }
    return arrays, info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--openvla-git", required=True, help="clone or bare mirror of github.com/openvla/openvla")
    ap.add_argument("--rev", default="c8f03f48af692657d3060c19588038c7220e9af9")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: tests/data)")
    args = ap.parse_args(argv)

    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # reproducible float reductions on CPU
    versions = check_versions()
    with tempfile.TemporaryDirectory() as src:
        provenance = export_original(args.openvla_git, args.rev, Path(src))
        conf_mod, model_mod, proc_mod = load_original(Path(src))
        summary = {
            "full_size": full_size_outputs(conf_mod, model_mod, proc_mod, provenance, versions, args.out),
            "tiny": tiny_outputs(conf_mod, model_mod, proc_mod, provenance, versions, args.out),
        }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
