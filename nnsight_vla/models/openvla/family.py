"""The registered ``openvla`` family: OpenVLA as an nnsight model with the uniform tree.

Loads the published checkpoint layout (config, tokenizer, preprocessor, safetensors under timm names), builds
tiny models offline, and greedily decodes the 7 action tokens, one traceable forward each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from ...errors import InputError
from ..base import VLA, check_instruction
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
from ..preprocessing import as_uint8_image
from ..registry import register
from ..tokenizer import build_llama_style_tokenizer
from ..transformer_lens import llama_bridge
from ..tree import Stack
from .configuration import OpenVLAConfig, tiny_config
from .conversion import PRISMATIC_LAYOUT, original_state_dict
from .modeling import OpenVLAForActionPrediction
from .processing import PROMPT, ActionBins, PrismaticImageTransform, default_image_config


@register("openvla")
class OpenVLA(VLA):
    """OpenVLA as an nnsight model with the uniform tree (``vla.layers[i].mlp.act``).

    ``predict_action(image, instruction, unnorm_key=None)`` returns the 7-dim action
    (dx, dy, dz, droll, dpitch, dyaw, gripper) as numpy, decoded from 7 greedily generated action tokens,
    one forward pass each (prefill + 6 cached steps): ``tracer.iter[:]`` reaches all seven.
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

    # -- inference -----------------------------------------------------------------------------------------

    def prompt(self, instruction: str) -> str:
        """OpenVLA's prompt for an instruction (lower-cased, as in the published predict_action)."""
        return PROMPT.format(instruction=check_instruction(instruction).lower())

    def prepare(self, image: Any, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (1, T), pixel_values (1, 6, H, W)) for one image and instruction."""
        pixel_values = self.image_processor(as_uint8_image(image, "image")).unsqueeze(0)
        ids = self.tokenizer(self.prompt(instruction), return_tensors="pt").input_ids
        if self.empty_token_id is not None and ids[0, -1].item() != self.empty_token_id:
            ids = torch.cat([ids, torch.tensor([[self.empty_token_id]])], dim=1)
        return ids, pixel_values

    def _predict_action(
        self, images: Any, instruction: str, state: Any = None, unnorm_key: str | None | bool = None,
        restrict_to_action_tokens: bool = False,
    ) -> np.ndarray:
        """Greedy-decode the 7 action tokens and un-normalise them.

        Args:
            images: one HxWx3 uint8 image (or ``{"primary": image}``).
            instruction: the task, e.g. "pick up the black bowl".
            unnorm_key: which dataset statistics to un-normalise with (required when the checkpoint has several);
                ``False`` returns the normalised [-1, 1] actions.
            restrict_to_action_tokens: pick the best *action* token at each step. Off by default, as in the
                published code, where a non-action token maps to a clipped extreme bin.
        """
        if state is not None:
            raise InputError("OpenVLA takes no robot state; pass state=None")
        (image,) = self.images_by_camera(images)
        n_tokens = self.bins.action_dim(unnorm_key)
        ids = self.generate_action_tokens(image, instruction, n_tokens, restrict_to_action_tokens)
        return self.bins.decode(ids, unnorm_key)

    def generate_action_tokens(
        self, image: Any, instruction: str, n_tokens: int = 7, restrict_to_action_tokens: bool = False
    ) -> np.ndarray:
        """The greedily generated action token ids (one forward pass per token)."""
        input_ids, pixel_values = self.prepare(image, instruction)
        return self.greedy_action_tokens(input_ids, pixel_values, n_tokens, restrict_to_action_tokens)

    def greedy_action_tokens(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, n_tokens: int = 7,
        restrict_to_action_tokens: bool = False,
    ) -> np.ndarray:
        """Greedy decoding from prepared inputs: a multimodal prefill, then one cached forward per further token."""
        model = self._module
        param = next(model.parameters())
        input_ids, pixel_values = input_ids.to(param.device), pixel_values.to(param.device, param.dtype)
        allowed = None
        if restrict_to_action_tokens:
            allowed = torch.full((self.vocab_size,), float("-inf"), device=param.device)
            allowed[torch.as_tensor(self.action_token_ids, device=param.device)] = 0.0
        tokens = []
        with torch.no_grad():
            out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
            for step in range(n_tokens):
                logits = out.logits[:, -1].float()
                if allowed is not None:
                    logits = logits + allowed
                next_id = logits.argmax(dim=-1)
                tokens.append(int(next_id[0]))
                if step + 1 < n_tokens:
                    out = model(input_ids=next_id[:, None], cache=out.cache, use_cache=True)
        return np.asarray(tokens)

    def _scan_call(self):
        ids = torch.ones(1, 4, dtype=torch.long)
        size = self.image_processor.image_size
        channels = 3 * len(self.image_processor.steps)
        pixels = torch.zeros(1, channels, *size)
        return self._module.forward, (), {"input_ids": ids, "pixel_values": pixels}
