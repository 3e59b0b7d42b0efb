"""The registered ``openvla`` family: OpenVLA as an nnsight model with the uniform tree.

Loads the published checkpoint layout (config, tokenizer, preprocessor, safetensors under timm names), builds
tiny models offline, and greedily decodes the 7 action tokens, one traceable forward each.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import InputError
from ..base import VLA, check_instruction
from ..batching import Observation, pad_rows
from ..checkpoints import (
    SafetensorsCheckpoint,
    load_layout,
    load_tokenizer,
    materialize_rest,
    read_json,
    resolve_folder,
    save_safetensors,
    write_json_atomic,
)
from ..outputs import check_logits
from ..preprocessing import as_uint8_image
from ..registry import register
from ..tokenizer import build_llama_style_tokenizer
from ..transformer_lens import llama_bridge
from ..tree import Stack
from .configuration import OpenVLAConfig, tiny_config
from .conversion import PRISMATIC_LAYOUT, original_state_dict
from .modeling import OpenVLAForActionPrediction
from .processing import PROMPT, ActionBins, PrismaticImageTransform, default_image_config

# the hub's prompt (what a hub user passes to its processor); an instruction already in this form is used as is
HUB_PROMPT = re.compile(r"In: What action should the robot take to .+\?\nOut:", re.S)
HUB_PREFIX = "in: what action should the robot take to"


@register("openvla")
class OpenVLA(VLA):
    """OpenVLA as an nnsight model with the uniform tree (``vla.layers[i].mlp.act``).

    ``predict_action(image, instruction, unnorm_key=None)`` returns the 7-dim action
    (dx, dy, dz, droll, dpitch, dyaw, gripper) as numpy, decoded from 7 greedily generated action tokens,
    one forward pass each (prefill + 6 cached steps): ``tracer.iter[:]`` reaches all seven. A batch pads each
    prompt between ``<s>`` + image patches and its text (masked; positions skip the padding), so every row's
    last token shares one index. The vision towers' last blocks, DINOv2's final norm and SigLIP's final norm
    and head never run (:meth:`never_run`).
    """

    # the model key names the package (nnsight_vla.models.openvla.OpenVLA): the public path, stable across layouts
    __module__ = "nnsight_vla.models.openvla"

    stacks = (Stack("backbone", "layers", "language_model.model.layers"),)
    lm_head_path = "language_model.lm_head"
    camera_names = ("primary",)
    model_class = OpenVLAForActionPrediction

    # -- loading -------------------------------------------------------------------------------------------

    def _load_processors(self, source, *, revision, tiny) -> None:
        if tiny is not None:
            self.config = tiny_config(tiny.get("config"))
            self.tokenizer = build_llama_style_tokenizer(vocab_size=self.config.token_vocab_size)
            self.image_processor = PrismaticImageTransform(default_image_config(self.config.featurizer_configs()))
        else:
            self.folder = resolve_folder(source, revision, patterns=("*.json", "*.safetensors", "tokenizer*"))
            self.config = OpenVLAConfig.from_dict(read_json(self.folder, "config.json"))
            # config= keeps transformers from re-reading config.json (whose auto_map would ask about remote code)
            self.tokenizer = load_tokenizer(self.folder, config=self.config, trust_remote_code=False)
            image_config = (
                read_json(self.folder, "preprocessor_config.json")
                if (self.folder / "preprocessor_config.json").is_file()
                else default_image_config(self.config.featurizer_configs(), self.config.image_resize_strategy)
            )
            self.image_processor = PrismaticImageTransform(image_config)
        self.bins = ActionBins(self.config.token_vocab_size, self.config.n_action_bins, self.config.norm_stats)
        self.empty_token_id = self._empty_token_id()
        vision = self.config.featurizer_configs()[0]
        self.n_patches = (vision.image_size // vision.patch_size) ** 2

    def _activation_configs(self) -> list:
        return [self.config, *self.config.featurizer_configs()]

    def _empty_token_id(self) -> int | None:
        # OpenVLA appends Llama's "▁" token (id 29871) to every prompt, as seen in training
        token_id = self.tokenizer.convert_tokens_to_ids("▁")
        return None if token_id is None or token_id == self.tokenizer.unk_token_id else int(token_id)

    def _init_tiny(self, module: nn.Module) -> nn.Module:
        # the published layout has no class-token position for DINOv2: keep tiny models representable in it
        with torch.no_grad():
            module.vision_backbone.featurizer.embeddings.position_embeddings[:, 0].zero_()
        return module

    def _load_weights(self, dtype: torch.dtype, device: Any) -> nn.Module:
        # the published checkpoint is in timm's names: build on meta, then load through the layout table
        with torch.device("meta"):
            module = self._new_module()
        load_layout(module, SafetensorsCheckpoint(self.folder), PRISMATIC_LAYOUT, dtype, device)
        materialize_rest(module, device)
        return module

    def save_pretrained(self, folder) -> None:
        """Write a checkpoint in the published openvla-7b layout: config.json, preprocessor_config.json,
        tokenizer files and (sharded) safetensors under the original parameter names."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.dispatch()
        config = self.config.to_dict()
        config["architectures"] = ["OpenVLAForActionPrediction"]
        config["auto_map"] = {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        }
        write_json_atomic(folder / "config.json", config)
        write_json_atomic(folder / "preprocessor_config.json", self.image_processor.to_dict())
        self.tokenizer.save_pretrained(str(folder))
        save_safetensors(original_state_dict(self._module), folder, max_shard_size=self._shard_size())

    def _shard_size(self) -> int | str:
        # tiny checkpoints are sharded too, so the sharded-index code path is what tests exercise
        n_bytes = sum(p.numel() * p.element_size() for p in self._module.parameters())
        return max(n_bytes // 2 + 1, 1024) if n_bytes < 1e9 else "5GB"

    # -- the uniform surface -------------------------------------------------------------------------------

    @property
    def action_token_ids(self) -> np.ndarray:
        """Ids of the 256 action tokens: the last 256 ids of the tokenizer's vocabulary (31744..31999 for 7B)."""
        return self.bins.token_ids

    @property
    def action_dim(self) -> int:
        return self.bins.action_dim(None if len(self.bins.norm_stats) == 1 else False)

    def forward_count(self, unnorm_key: str | None | bool = None, **_: Any) -> int:
        """One forward per action token: the multimodal prefill, then a cached step per further token (7)."""
        return self.bins.action_dim(unnorm_key)

    def input_embeddings(self) -> torch.Tensor:
        return self._module.language_model.get_input_embeddings().weight

    def to_transformer_lens(self, stack: str = "backbone"):
        """A TransformerLens ``TransformerBridge`` over the Llama backbone, sharing its weights."""
        self.stack(stack)
        self.dispatch()
        return llama_bridge(self._module.language_model, self.tokenizer)

    def never_run(self) -> list[tuple[str, bool, str]]:
        why = "Prismatic reads each vision tower at its second-to-last block (patch tokens, no final norm)"
        whole = "the tower is run block by block (Prismatic's penultimate-layer features), never as a whole"
        backbone = self._module.vision_backbone
        out = []
        for attr in ("featurizer", "fused_featurizer"):
            tower = getattr(backbone, attr, None)
            if tower is None:
                continue
            where = f"vision_backbone.{attr}"
            blocks = "encoder.layer" if hasattr(tower.encoder, "layer") else "encoder.layers"
            out += [(where, False, whole), (f"{where}.encoder", False, whole),
                    (f"{where}.{blocks}.{len(tower.get_submodule(blocks)) - 1}", True, why)]
            out += [(f"{where}.{name}", True, why) for name in ("layernorm", "post_layernorm", "head")
                    if getattr(tower, name, None) is not None]
        return out

    # -- inference -----------------------------------------------------------------------------------------

    def prompt(self, instruction: str) -> str:
        """OpenVLA's prompt for an instruction (lower-cased, as in the published evaluations). A hub prompt
        (``"In: What action should the robot take to ...?\\nOut:"``) is used as is, as the hub's
        ``predict_action`` would use it; a partly wrapped one is refused."""
        text = check_instruction(instruction)
        if text.lstrip().lower().startswith(HUB_PREFIX) or "\nOut:" in text:
            if HUB_PROMPT.fullmatch(text):
                return text
            raise InputError(
                f"{text!r} looks like a partly wrapped OpenVLA prompt; pass the task alone ('pick up the bowl') or "
                "the whole hub prompt 'In: What action should the robot take to pick up the bowl?\\nOut:'"
            )
        return PROMPT.format(instruction=text.lower())

    def _prompt_ids(self, instruction: str) -> list[int]:
        ids = list(self.tokenizer(self.prompt(instruction)).input_ids)
        if self.empty_token_id is not None and ids[-1] != self.empty_token_id:
            ids.append(self.empty_token_id)  # the published predict_action appends "▁" (id 29871)
        return ids

    def prepare(self, image: Any, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (1, T), pixel_values (1, 6, H, W)) for one image and instruction."""
        pixel_values = self.image_processor(as_uint8_image(image, "image")).unsqueeze(0)
        return torch.tensor([self._prompt_ids(instruction)]), pixel_values

    def _prefill(self, observations: list[Observation], n_tokens: int) -> dict[str, torch.Tensor]:
        rows, pixels = [], []
        limit = self.config.text_config.max_position_embeddings
        for obs in observations:
            if obs.state is not None:
                raise InputError("OpenVLA takes no robot state; pass state=None")
            (image,) = self.images_by_camera(obs.images)
            ids, pixel_values = self.prepare(image, obs.instruction)
            used = ids.shape[1] + self.n_patches + n_tokens - 1
            if used > limit:
                raise InputError(
                    f"the prompt is {ids.shape[1]} tokens + {self.n_patches} image patches + {n_tokens - 1} decoded "
                    f"tokens = {used} positions, more than OpenVLA's max_position_embeddings ({limit}); shorten "
                    "the instruction"
                )
            rows.append(ids[0].tolist())
            pixels.append(pixel_values)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.config.pad_token_id
        input_ids, mask = pad_rows(rows, int(pad or 0), "after_first")
        inputs = {"input_ids": input_ids, "pixel_values": torch.cat(pixels)}
        if mask is not None:
            inputs["attention_mask"] = mask
        return inputs

    def _forward_batch(self, observations: list[Observation], **options: Any) -> dict[str, torch.Tensor]:
        if options:
            raise InputError(f"vla.trace(observation) takes no options for OpenVLA, got {sorted(options)}")
        return self._prefill(observations, 1)

    def _predict_batch(
        self, observations: list[Observation], unnorm_key: str | None | bool = None,
        restrict_to_action_tokens: bool = False, do_sample: bool = False,
    ) -> np.ndarray:
        """Greedy-decode the 7 action tokens of every observation and un-normalise them.

        ``unnorm_key``: the dataset statistics (required when the checkpoint has several; ``False``: normalised
        [-1, 1] actions). ``restrict_to_action_tokens``: best *action* token at each step (off, as published: a
        non-action token maps to a clipped extreme bin). ``do_sample``: the hub's flag; only False (greedy).
        """
        if do_sample is not False:
            raise InputError(
                f"do_sample={do_sample!r}: OpenVLA's actions are decoded greedily here, as in the published "
                "evaluations (the hub's do_sample=False); sampling is not implemented"
            )
        n_tokens = self.bins.action_dim(unnorm_key)
        tokens = self._greedy(self._prefill(observations, n_tokens), n_tokens, restrict_to_action_tokens)
        return np.stack([self.bins.decode(row, unnorm_key) for row in tokens])

    def generate_action_tokens(
        self, image: Any, instruction: str, n_tokens: int = 7, restrict_to_action_tokens: bool = False
    ) -> np.ndarray:
        """The greedily generated action token ids (one forward pass per token)."""
        inputs = self._prefill([Observation(image, instruction)], n_tokens)
        return self._greedy(inputs, n_tokens, restrict_to_action_tokens)[0]

    def greedy_action_tokens(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, n_tokens: int = 7,
        restrict_to_action_tokens: bool = False, attention_mask: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Greedy decoding from prepared inputs: (n_tokens,) for one row, (B, n_tokens) for several."""
        inputs = {"input_ids": input_ids, "pixel_values": pixel_values}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        tokens = self._greedy(inputs, n_tokens, restrict_to_action_tokens)
        return tokens[0] if tokens.shape[0] == 1 else tokens

    def _greedy(self, inputs: dict, n_tokens: int, restrict_to_action_tokens: bool) -> np.ndarray:
        """(B, n_tokens) greedy ids: a multimodal prefill, then one cached forward per further token."""
        self.dispatch()
        model = self._module
        param = next(model.parameters())
        input_ids = inputs["input_ids"].to(param.device)
        mask = inputs.get("attention_mask")
        allowed = None
        if restrict_to_action_tokens:
            allowed = torch.full((self.vocab_size,), float("-inf"), device=param.device)
            allowed[torch.as_tensor(self.action_token_ids, device=param.device)] = 0.0
        tokens = []
        with torch.no_grad():
            out = model(input_ids=input_ids, pixel_values=inputs["pixel_values"].to(param.device, param.dtype),
                        attention_mask=None if mask is None else mask.to(param.device), use_cache=True)
            if mask is not None:  # the language model's mask: <s>, the image patches, then the padded text
                mask = mask.to(param.device)
                patches = mask.new_ones(mask.shape[0], out.cache.get_seq_length() - mask.shape[1])
                mask = torch.cat([mask[:, :1], patches, mask[:, 1:]], dim=1)
            for step in range(n_tokens):
                logits = out.logits[:, -1].float()
                check_logits(logits, self.family, step)
                if allowed is not None:
                    logits = logits + allowed
                next_id = logits.argmax(dim=-1)
                tokens.append(next_id.cpu())
                if step + 1 < n_tokens:
                    if mask is not None:
                        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                    out = model(input_ids=next_id[:, None], cache=out.cache, use_cache=True, attention_mask=mask)
        return torch.stack(tokens, dim=1).numpy()

    def _scan_call(self):
        ids = torch.ones(1, 4, dtype=torch.long)
        size = self.image_processor.image_size
        channels = 3 * len(self.image_processor.steps)
        pixels = torch.zeros(1, channels, *size)
        return self._module.forward, (), {"input_ids": ids, "pixel_values": pixels}
