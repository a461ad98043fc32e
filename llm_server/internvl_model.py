"""vLLM's InternVLChatModel with the two changes DvD needs; everything else is vLLM's own code.

1. Ragged embeddings: vLLM 0.32 declares image embeddings as `TensorShape("n", "f", "h")` without
   `dynamic_dims={"f"}`, so a request whose images have different token counts (two image sizes, or any ViR
   output) fails schema validation inside the EngineCore ("data contains inconsistent shapes") and kills it.
2. Flash checkpoints: InternVL3.5-Flash ships `mlp2`, `pooling_before_gating` and `gating` weights that vLLM's
   model has no place for; the language side never needs them (the vision server runs the router), so they are
   skipped instead of failing the load.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from vllm.model_executor.models.internvl import InternVLChatModel
from vllm.model_executor.models.utils import WeightsMapper
from vllm.utils.tensor_schema import TensorSchema, TensorShape

FLASH_ONLY_PREFIXES = ("mlp2.", "pooling_before_gating.", "gating.")


class RaggedImageEmbeddingInputs(TensorSchema):
    """Dimensions:
    - n: Number of images
    - f: Image feature size (differs per image)
    - h: Hidden size of the language model
    """

    type: Literal["image_embeds"]
    data: Annotated[torch.Tensor | list[torch.Tensor], TensorShape("n", "f", "h", dynamic_dims={"f"})]


class DvdInternVLChatModel(InternVLChatModel):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            **InternVLChatModel.hf_to_vllm_mapper.orig_to_new_prefix,
            **dict.fromkeys(FLASH_ONLY_PREFIXES),
        }
    )

    def _parse_and_validate_image_input(self, **kwargs: object):
        image_embeds = kwargs.get("image_embeds")
        if image_embeds is None:
            return super()._parse_and_validate_image_input(**kwargs)
        kwargs.pop("image_embeds")
        kwargs.pop("pixel_values_flat", None)
        kwargs.pop("image_num_patches", None)
        return RaggedImageEmbeddingInputs(type="image_embeds", data=image_embeds)
