"""The registered ``pi0`` family: pi0 (flow matching) on transformers' native ``PI0ForConditionalGeneration``.

``model.vlm`` is a PaliGemma backbone (SigLIP + Gemma, ``vla.layers``) and ``model.dit`` the action expert
(``vla.expert_layers``), a smaller Gemma that attends to the backbone's KV cache. Checkpoints are transformers'
PI0 format; the forward structure, the ``lm_head`` and the noise are described on :class:`PI0`.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers import PI0Config, PI0ForConditionalGeneration, PI0Processor

from ..errors import CheckpointError, InputError
from .base import VLA, check_camera_names, check_instruction, positive_int
from .batching import Observation
from .checkpoints import load_tokenizer, read_config, read_json, resolve_folder, write_json_atomic
from .paligemma import TINY_GEMMA, TINY_SIGLIP, PI0ImageProcessorPil, TiedUnembedding, build_paligemma_style_tokenizer
from .outputs import check_finite
from .paligemma_lens import pi0_backbone_bridge
from .preprocessing import as_uint8_image
from .registry import register
from .tree import Stack

PROCESSOR_CONFIG = "processor_config.json"

# Dataset statistics of the tiny model (7-dim state and actions), so tiny checkpoints exercise un-normalisation.
TINY_STATS = {
    "state_mean": [0.1 * i for i in range(7)],
    "state_std": [0.5 + 0.1 * i for i in range(7)],
    "actions_mean": [0.01 * i - 0.03 for i in range(7)],
    "actions_std": [0.05 + 0.01 * i for i in range(7)],
}


def tiny_config(overrides: dict | None = None) -> tuple[PI0Config, dict | None]:
    """(config, dataset statistics) of a tiny pi0: the exact wiring at small widths.

    ``overrides`` may set ``text`` (backbone Gemma fields), ``vision`` (SigLIP fields), ``expert`` (expert Gemma
    fields), ``image_size``, ``chunk_size``, ``num_inference_steps``, ``max_state_dim``, ``max_action_dim``,
    ``vocab`` (tokenizer size) and ``stats`` (a PI0Processor statistics dict, or None for none).
    """
    overrides = dict(overrides or {})
    vocab = int(overrides.pop("vocab", 1024))
    image_size = int(overrides.pop("image_size", 32))
    text = {**TINY_GEMMA, **overrides.pop("text", {})}
    vision = {**TINY_SIGLIP, **overrides.pop("vision", {})}
    # the expert reads the backbone's KV cache layer by layer: same depth, kv heads and head_dim
    expert = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_hidden_layers=text["num_hidden_layers"], num_key_value_heads=text["num_key_value_heads"],
                  head_dim=text["head_dim"])
    expert.update(overrides.pop("expert", {}))
    stats = overrides.pop("stats", TINY_STATS)
    top = dict(chunk_size=5, num_inference_steps=3, max_state_dim=8, max_action_dim=8)
    top.update({k: overrides.pop(k) for k in list(overrides) if k in top})
    if overrides:
        raise InputError(f"unknown tiny pi0 overrides: {sorted(overrides)}")
    config = PI0Config(
        vlm_config=dict(
            model_type="paligemma",
            text_config=dict(model_type="gemma", vocab_size=vocab, **text),
            vision_config=dict(model_type="siglip_vision_model", image_size=image_size, **vision),
            projection_dim=text["hidden_size"],
            image_token_id=vocab,
        ),
        dit_config=dict(model_type="gemma", **expert),
        **top,
    )
    return config, (dict(stats) if stats is not None else None)


@register("pi0")
class PI0(VLA):
    """pi0 as an nnsight model: ``vla.layers`` (PaliGemma backbone) and ``vla.expert_layers`` (action expert).

    ``predict_action(images, instruction, state, seed=0)`` returns the action chunk ``(horizon, action_dim)``.
    Extra load option: ``camera_names`` (default ``("base", "wrist")``), the cameras in prompt order.

    **Forwards.** One ``predict_action`` makes K root forwards, one per Euler step of the flow (``num_steps``,
    default ``config.num_inference_steps``). Forward 0 takes the images and the prompt: it runs the vision tower
    and the backbone over the prefix once (filling the KV cache), then the expert; forwards 1..K-1 run the expert
    only, against the cached prefix. So ``tracer.iter[:K]`` walks the K denoising steps, the backbone is reached
    in step 0 only (``vla.stack_forwards("backbone") == [0]``) and the expert in every step. An edit on the
    backbone acts through the cached prefix on every step; inside a ``tracer.iter`` loop touch the backbone only
    when ``step in vla.stack_forwards("backbone")`` (asking for backbone step 1 parks the loop: nnsight cuts the
    block with a warning and the expert edits of later steps are never applied).

    **lm_head.** pi0 never decodes tokens, so it has no LM head: ``vla.lm_head`` is PaliGemma's own tied
    unembedding, ``logits = h @ E.T`` with E the backbone's input embedding (no sqrt(d_model) factor: Gemma scales
    on the input side only), the projection the logit lens needs for the backbone's value vectors. The expert has
    no projection onto the vocabulary, and ``action_token_ids`` raises.

    **Checkpoints**: ``PI0ForConditionalGeneration.save_pretrained`` + ``PI0Processor.save_pretrained``
    (``processor_config.json`` with ``state_mean/std``, ``actions_mean/std``, ``chunk_size``, ``max_state_dim``
    and the ``image_processor`` dict; tokenizer files). Without statistics, states are taken as normalised and
    actions are returned normalised (``action_dim`` = ``max_action_dim``).

    **Noise**: deterministic in ``seed`` (a CPU ``torch.Generator``), or pass ``noise``, so steered and unsteered
    runs start from the same sample. In a batch, ``seed`` / ``noise`` may be one per element.

    **Batches** pad prompts on the right with a mask (transformers' PI0 processor; positions from the mask).
    Never run: the expert's token embedding and ``lm_head`` (:meth:`never_run`).
    """

    stacks = (
        Stack("backbone", "layers", "model.vlm.language_model.layers"),
        Stack("expert", "expert_layers", "model.dit.layers"),
    )
    lm_head_path = "unembed"
    camera_names = ("base", "wrist")
    model_class = PI0ForConditionalGeneration
    attn_implementation = "sdpa"
    per_element_options = MappingProxyType({"seed": 0, "noise": 2})

    def __init__(self, source: Any = None, *, camera_names: Any = None, **kwargs: Any) -> None:
        if camera_names is not None:
            self.camera_names = check_camera_names(camera_names)
        self.family_options = {"camera_names": None if camera_names is None else list(self.camera_names)}
        super().__init__(source, **kwargs)

    # -- loading -------------------------------------------------------------------------------------------

    def _load_processors(self, source, *, revision, tiny) -> None:
        if tiny is not None:
            self.config, stats = tiny_config(tiny.get("config"))
            vision = self.config.vlm_config.vision_config
            self.tokenizer = build_paligemma_style_tokenizer(vocab_size=self.config.vlm_config.text_config.vocab_size)
            size = vision.image_size
            self.image_processor = PI0ImageProcessorPil(
                size={"max_height": size, "max_width": size}, pad_size={"height": size, "width": size},
                image_seq_length=(size // vision.patch_size) ** 2,
            )
        else:
            patterns = ("*.json", "*.safetensors", "tokenizer*", "*.model")
            self.folder = resolve_folder(source, revision, patterns=patterns)
            self.config = read_config(
                self.folder, PI0Config, "pi0",
                "the pi0 family loads transformers' PI0 format (use family 'pi0-fast' for a PaliGemma checkpoint)",
            )
            processor = read_json(self.folder, PROCESSOR_CONFIG) if (self.folder / PROCESSOR_CONFIG).is_file() else {}
            image = processor.get("image_processor")
            if image is None and (self.folder / "preprocessor_config.json").is_file():
                image = read_json(self.folder, "preprocessor_config.json")
            if image is None:
                raise CheckpointError(
                    f"{self.folder} has no image processor settings (an 'image_processor' entry in {PROCESSOR_CONFIG} "
                    "or a preprocessor_config.json), as PI0Processor.save_pretrained writes them"
                )
            self.image_processor = PI0ImageProcessorPil.from_config_dict(image)
            self.tokenizer = load_tokenizer(self.folder)
            stats = {k: processor.get(k) for k in ("state_mean", "state_std", "actions_mean", "actions_std")}
            stats = stats if all(v is not None for v in stats.values()) else None
        self.stats = stats
        self.processor = PI0Processor(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            max_state_dim=self.config.max_state_dim,
            chunk_size=self.config.chunk_size,
            **(stats or {}),
        )
        self._check_stats()

    def _check_stats(self) -> None:
        if self.stats is None:
            return
        for key, limit in (("state", self.config.max_state_dim), ("actions", self.config.max_action_dim)):
            mean, std = self.stats[f"{key}_mean"], self.stats[f"{key}_std"]
            if len(mean) != len(std) or not 0 < len(mean) <= limit:
                raise CheckpointError(
                    f"{key}_mean/{key}_std have lengths {len(mean)}/{len(std)}; they must match and be 1..{limit}"
                )

    def _finish(self, module: nn.Module) -> nn.Module:
        module.unembed = TiedUnembedding(module.model.vlm.language_model.embed_tokens)
        return super()._finish(module)

    def save_pretrained(self, folder) -> None:
        """Write a transformers PI0 checkpoint: the model's ``save_pretrained`` plus the ``PI0Processor``'s
        (``processor_config.json`` with the statistics and the image processor, tokenizer files)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.dispatch()
        self._module.save_pretrained(str(folder))
        self.processor.save_pretrained(str(folder))
        # the PIL twin names itself like the torchvision class; make sure the saved dict says so
        config = read_json(folder, PROCESSOR_CONFIG)
        config.setdefault("image_processor", {})["image_processor_type"] = "PI0ImageProcessor"
        write_json_atomic(folder / PROCESSOR_CONFIG, config)

    # -- the uniform surface -------------------------------------------------------------------------------

    @property
    def action_token_ids(self) -> np.ndarray:
        raise InputError(
            "pi0 has no action tokens: it produces actions by flow matching through its action expert "
            "(vla.expert_layers), not by decoding vocabulary ids. Use the pi0-fast family for FAST action tokens."
        )

    @property
    def action_dim(self) -> int:
        """Action dimensions returned (the statistics' length; ``max_action_dim`` without statistics)."""
        return len(self.stats["actions_mean"]) if self.stats else int(self.config.max_action_dim)

    @property
    def action_horizon(self) -> int:
        """Actions per chunk (``config.chunk_size``)."""
        return int(self.config.chunk_size)

    @property
    def state_dim(self) -> int | None:
        """State dimension the statistics fix; None without statistics (any length up to ``max_state_dim``)."""
        return len(self.stats["state_mean"]) if self.stats else None

    def input_embeddings(self) -> torch.Tensor:
        return self._module.model.vlm.language_model.embed_tokens.weight

    def forward_count(self, num_steps: int | None = None, **_: Any) -> int:
        """Root-module forwards in one ``predict_action``: one per denoising step (the prefix rides in step 0)."""
        return self._num_steps(num_steps)

    def stack_forwards(self, stack: str = "backbone", num_steps: int | None = None, **_: Any) -> list[int]:
        """The forwards (``tracer.iter`` indices) in which a stack runs: backbone ``[0]``, expert every step."""
        name = self.stack(stack).name
        return [0] if name == "backbone" else list(range(self._num_steps(num_steps)))

    def to_transformer_lens(self, stack: str = "backbone"):
        """A TransformerLens bridge over the PaliGemma backbone (a ``PaliGemmaForConditionalGeneration`` sharing
        this model's backbone tensors, ``lm_head`` tied to the embedding). The expert has no TL view."""
        if self.stack(stack).name != "backbone":
            raise InputError(
                "only the PaliGemma backbone has a TransformerLens view; the action expert has no unembedding"
            )
        self.dispatch()
        return pi0_backbone_bridge(self._module, self.tokenizer)

    # -- inference -----------------------------------------------------------------------------------------

    def _num_steps(self, num_steps: int | None) -> int:
        return positive_int(self.config.num_inference_steps if num_steps is None else num_steps, "num_steps")

    def _state(self, state: Any) -> np.ndarray:
        if state is None:
            size = self.state_dim or f"up to {self.config.max_state_dim}"
            raise InputError(f"pi0 needs the robot state (a vector of {size} numbers)")
        try:
            array = np.asarray(state, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as error:
            raise InputError(f"state must be a vector of numbers: {error}") from error
        want = self.state_dim
        if want is not None and array.shape[0] != want:
            raise InputError(
                f"pi0 expects a state of dimension {want} (the checkpoint's statistics), got {array.shape[0]}"
            )
        if want is None and not 0 < array.shape[0] <= self.config.max_state_dim:
            raise InputError(f"pi0 takes a state of 1..{self.config.max_state_dim} numbers, got {array.shape[0]}")
        if not np.all(np.isfinite(array)):
            raise InputError(f"pi0 state contains NaN or infinite values: {array}")
        return array

    def prepare(self, images: Any, instruction: str, state: Any) -> dict[str, torch.Tensor]:
        """Model inputs for one observation, through ``PI0Processor``: ``input_ids`` / ``attention_mask``
        (image tokens, ``<bos>``, instruction, newline, padded), ``pixel_values`` (1, cameras, 3, H, W),
        ``pixel_attention_mask`` and the normalised, zero-padded ``state`` (1, max_state_dim)."""
        by_camera = zip(self.camera_names, self.images_by_camera(images))
        cams = [as_uint8_image(img, f"camera {name!r}") for name, img in by_camera]
        # openpi's prompt cleaning for pi0: one line, underscores as spaces
        text = check_instruction(instruction).strip().replace("_", " ").replace("\n", " ")
        array = self._state(state)
        inputs = self.processor(images=[cams], text=text, state=array if self.stats else None)
        if not self.stats:
            padded = np.zeros(self.config.max_state_dim, dtype=np.float32)
            padded[: array.shape[0]] = array
            inputs["state"] = torch.from_numpy(padded)[None]
        return dict(inputs)

    def sample_noise(self, seed: int = 0) -> torch.Tensor:
        """The initial flow sample (1, chunk_size, max_action_dim), deterministic in ``seed``."""
        generator = torch.Generator().manual_seed(int(seed))
        return torch.randn(1, self.config.chunk_size, self.config.max_action_dim, generator=generator)

    def _prefill(self, observations: list[Observation]) -> dict[str, torch.Tensor]:
        """The batch's prefix inputs: each element through ``prepare``, prompts right-padded to one length."""
        rows = [self.prepare(o.images, o.instruction, o.state) for o in observations]
        limit = min(self.config.vlm_config.text_config.max_position_embeddings,
                    self.config.dit_config.max_position_embeddings)
        for row in rows:
            used = int(row["attention_mask"].sum()) + 1 + self.config.chunk_size  # prefix, state token, chunk
            if used > limit:
                raise InputError(
                    f"the prompt and image tokens, the state token and the {self.config.chunk_size}-action chunk need "
                    f"{used} positions, more than pi0's max_position_embeddings ({limit}); shorten the instruction"
                )
        length = max(row["input_ids"].shape[1] for row in rows)
        pad = {"input_ids": int(self.tokenizer.pad_token_id or 0), "attention_mask": 0}
        return {
            key: torch.cat([
                F.pad(row[key], (0, length - row[key].shape[1]), value=pad[key]) if key in pad else row[key]
                for row in rows
            ])
            for key in rows[0]
        }

    def _predict_batch(
        self,
        observations: list[Observation],
        num_steps: int | None = None,
        horizon: int | None = None,
        unnormalize: bool = True,
    ) -> np.ndarray:
        """Run the flow for a batch: ``num_steps`` Euler steps from noise at t=1 to actions at t=0.

        Per observation: ``images`` (``{"base": img, "wrist": img}`` or a list in ``camera_names`` order),
        ``state`` (``state_dim`` numbers, un-normalised), ``seed`` / ``noise`` (the initial sample, shape
        (chunk_size, max_action_dim)). ``horizon``: the first actions of the chunk; ``unnormalize``: map back with
        the checkpoint's ``actions_mean/std``. Returns float32 (B, horizon, action_dim).
        """
        horizon = self._horizon(horizon)
        steps = self._num_steps(num_steps)
        inputs = self._prefill(observations)
        x = torch.cat([self._noise(o.options.get("noise"), o.options.get("seed")) for o in observations])
        actions = self.denoise(inputs, x, steps)[:, :horizon, : self.action_dim].float().cpu().numpy()
        if unnormalize and self.stats:
            mean = np.asarray(self.stats["actions_mean"], dtype=np.float32)
            std = np.asarray(self.stats["actions_std"], dtype=np.float32)
            actions = actions * (std + 1e-8) + mean  # inverse of PI0Processor.normalize
        return actions

    def _forward_batch(self, observations: list[Observation], **options: Any) -> dict[str, torch.Tensor]:
        if options:
            raise InputError(f"vla.trace(observation) takes only seed= / noise= for pi0, got {sorted(options)}")
        inputs = self._prefill(observations)
        dtype = next(self._module.parameters()).dtype
        noise = torch.cat([self._noise(o.options.get("noise"), o.options.get("seed")) for o in observations])
        return {
            "state": inputs["state"].to(dtype), "noise": noise.to(dtype),
            "timestep": torch.ones(len(observations), dtype=torch.float32), "input_ids": inputs["input_ids"],
            "pixel_values": inputs["pixel_values"].to(dtype), "pixel_attention_mask": inputs["pixel_attention_mask"],
            "attention_mask": inputs["attention_mask"],
        }

    def _noise(self, noise: Any, seed: Any) -> torch.Tensor:
        shape = (1, self.config.chunk_size, self.config.max_action_dim)
        if noise is None:
            return self.sample_noise(0 if seed is None else seed)
        x = torch.as_tensor(np.asarray(noise) if not isinstance(noise, torch.Tensor) else noise, dtype=torch.float32)
        if x.dim() == 2:
            x = x[None]
        if tuple(x.shape) != shape or not torch.isfinite(x).all():
            raise InputError(f"noise must be a finite array of shape {shape[1:]} (or {shape}), got {tuple(x.shape)}")
        return x

    def denoise(self, inputs: dict[str, torch.Tensor], noise: torch.Tensor, num_steps: int) -> torch.Tensor:
        """The flow loop (one root forward per step; step 0 also fills the prefix KV cache). Returns x at t=0
        (B, chunk_size, max_action_dim), the same computation as transformers' ``sample_actions``."""
        self.dispatch()  # called directly (not through a trace) on a meta-built model: load the weights now
        model = self._module
        param = next(model.parameters())
        inputs = {k: v.to(param.device) for k, v in inputs.items()}
        x = noise.to(param.device, param.dtype)
        prefix_length = inputs["input_ids"].shape[1]
        dt = -1.0 / num_steps
        cache = None
        with torch.no_grad():
            for step in range(num_steps):
                time = torch.full((x.shape[0],), 1.0 + step * dt, dtype=torch.float32, device=param.device)
                prefix = {} if cache is not None else {
                    "input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"].to(param.dtype)
                }
                out = model(
                    state=inputs["state"].to(param.dtype), noise=x, timestep=time,
                    pixel_attention_mask=inputs["pixel_attention_mask"], attention_mask=inputs["attention_mask"],
                    cache=cache, **prefix,
                )
                check_finite(out.logits, self.family, f"the flow velocity of denoising step {step}")
                cache = out.cache
                cache.crop(prefix_length - cache.get_seq_length())  # keep the prefix, drop this step's suffix
                x = x + dt * out.logits
        check_finite(x, self.family, "the action chunk")
        return x

    def never_run(self) -> list[tuple[str, bool, str]]:
        return [
            ("model.dit.embed_tokens", True, "the action expert embeds noisy actions and the state, never token ids"),
            ("unembed", True, "pi0 decodes no tokens; lm_head is the backbone's tied unembedding for the logit lens, "
                              "which predict_action never runs (apply it yourself: vla.lm_head(hidden))"),
        ]

    def _scan_call(self):
        model = self._module
        vision = self.config.vlm_config.vision_config
        n_image = (vision.image_size // vision.patch_size) ** 2
        cams = len(self.camera_names)
        ids = torch.full((1, n_image * cams + 3), self.config.vlm_config.image_token_id, dtype=torch.long)
        ids[0, -3:] = torch.tensor([2, 5, 6])
        d_model = self.config.vlm_config.text_config.hidden_size

        def forward(**inputs):
            out = model(**inputs)
            model.unembed(out.logits.new_zeros(1, 1, d_model))  # reach lm_head after both stacks
            return out

        kwargs = dict(
            state=torch.zeros(1, self.config.max_state_dim),
            noise=torch.zeros(1, self.config.chunk_size, self.config.max_action_dim),
            timestep=torch.ones(1),
            input_ids=ids,
            pixel_values=torch.zeros(1, cams, 3, vision.image_size, vision.image_size),
            pixel_attention_mask=torch.ones(1, cams, dtype=torch.bool),
            attention_mask=torch.ones_like(ids),
        )
        return forward, (), kwargs
