"""Vision-tower adapters: what :class:`~medalign_platform.core.teacher.ExpertTeacher` needs from each CLIP family.

The teacher reads two things from the LAST transformer block of a CLIP vision tower with
forward hooks (see ``teacher.py``): the output of the block's pre-attention norm (the
attention input, from which the CLS row of ``softmax(q k^T * scale)`` is recomputed with the
block's own weights) and the block's output. Each adapter below names those modules and
supplies the few pieces that differ between implementations:

=================  ==========================================  ==========================
adapter            model                                       teachers
=================  ==========================================  ==========================
``NativeViT``      open_clip ``VisionTransformer``             OpenAI CLIP, UniMed-CLIP
``TimmViT``        open_clip ``TimmModel`` + timm ViT          BiomedCLIP
``HFCLIPVision``   transformers ``CLIPModel``                  PubMedCLIP
=================  ==========================================  ==========================

Every adapter also exposes the linear pieces ``prompt_aware_attention`` needs (attention
output projection, layer scale, final norm, image projection) and the text side (question
embeddings), so the teacher itself never branches on the family.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["HFCLIPVision", "NativeViT", "TimmViT", "Tower", "tower_for"]


def split_heads(x: Tensor, heads: int) -> Tensor:
    """``[B, L, H*hd] -> [B, H, L, hd]``."""
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def _linear_maps(modules: Sequence[nn.Module], what: str) -> list[nn.Linear]:
    """Keeps the linear layers of a head; dropout/identity are no-ops in eval mode."""
    linears = []
    for module in modules:
        if isinstance(module, (nn.Identity, nn.Dropout)):
            continue
        if isinstance(module, nn.Linear):
            linears.append(module)
        else:
            raise NotImplementedError(
                f"prompt_aware_attention needs a linear map from the CLS token to the "
                f"joint embedding; {what} contains {type(module).__name__}, which is not "
                f"linear. Use encode() (plain CLS attention) for this teacher.")
    return linears


class Tower:
    """What the teacher needs from one vision-tower implementation.

    Attributes:
        vision: the vision module (its ``repr`` is part of the teacher identity).
        grid: ``(h, w)`` native patch grid.
        width: D_t.
        heads: number of attention heads of the last block.
        num_prefix: number of prefix tokens (CLS first, then e.g. registers).
        image_size: ``(S_h, S_w)`` expected input size.
        attn_input: module whose output is the last block's attention input.
        last_block: the last transformer block.
    """

    vision: nn.Module
    grid: tuple[int, int]
    width: int
    heads: int
    num_prefix: int
    image_size: tuple[int, int]
    attn_input: nn.Module
    last_block: nn.Module

    def batch_first(self, x: Tensor) -> Tensor:
        """Hooked tensors in ``[B, L, D]`` layout."""
        return x

    def input_dtype(self) -> torch.dtype:
        """dtype the pixels must have: that of the patch-embedding weights (open_clip's
        mixed "fp16"/"bf16" precisions keep some vision parameters in fp32)."""
        raise NotImplementedError

    def image_embedding(self, pixel_values: Tensor) -> Tensor:
        """Runs the whole vision tower (the hooks fire): ``[B, 3, S, S] -> [B, E]``."""
        raise NotImplementedError

    def text_embedding(self, questions: Sequence[str], tokenizer, device) -> Tensor:
        """``list[str] -> [B, E]`` L2-normalised text embeddings (fp32)."""
        raise NotImplementedError

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q, k, v of the last block, each ``[B, H, L, hd]`` (q/k normed)."""
        raise NotImplementedError

    def attn_scale(self) -> float:
        raise NotImplementedError

    # Pieces used only by prompt_aware_attention.
    def out_proj_weight(self) -> Tensor:
        """``[D, H*hd]`` attention output projection (bias excluded)."""
        raise NotImplementedError

    def layer_scale(self) -> nn.Module:
        return nn.Identity()

    def final_norm(self) -> nn.LayerNorm | None:
        raise NotImplementedError

    def to_embedding(self, x: Tensor) -> Tensor:
        """Linear part of the map from the normed CLS token to the joint space,
        ``[..., D] -> [..., E]``."""
        raise NotImplementedError


class _OpenClipTower(Tower):
    """Shared open_clip pieces: the image forward and ``encode_text``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.vision = model.visual

    def image_embedding(self, pixel_values: Tensor) -> Tensor:
        embedding = self.model.visual(pixel_values)
        return embedding[0] if isinstance(embedding, tuple) else embedding  # (pooled, tokens) towers

    def text_embedding(self, questions: Sequence[str], tokenizer, device) -> Tensor:
        tokens = tokenizer(list(questions)).to(device)
        return self.model.encode_text(tokens, normalize=True).float()


class NativeViT(_OpenClipTower):
    """open_clip ``VisionTransformer`` with ``nn.MultiheadAttention`` blocks."""

    def __init__(self, model: nn.Module):
        from open_clip.transformer import ResidualAttentionBlock

        super().__init__(model)
        visual = model.visual
        if visual.attn_pool is not None:
            raise ValueError(
                "Unsupported teacher: the open_clip vision tower uses attentional pooling "
                "(CoCa-style), so the CLS token is not its image embedding. Use a "
                "CLS-pooled ViT (e.g. CLIP/UniMed-CLIP ViT-B/16, BiomedCLIP).")
        if visual.pool_type != "tok":
            raise ValueError(
                f"Unsupported teacher: vision pool_type={visual.pool_type!r}; the CLS "
                "attention target needs CLS-token pooling (pool_type='tok').")
        block = visual.transformer.resblocks[-1]
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(
                block.attn, nn.MultiheadAttention):
            raise ValueError(
                f"Unsupported teacher: last vision block is {type(block).__name__}; only "
                "open_clip's default ResidualAttentionBlock (nn.MultiheadAttention) is "
                "supported (block_type='custom', qk_norm, scaled-cosine attention are not).")
        attn = block.attn
        if (not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn
                or hasattr(block, "ln_1_kv")):
            raise ValueError("Unsupported teacher: last block's attention is not plain "
                             "self-attention with a packed in_proj.")
        self.visual = visual
        self.block = block
        self.attn = attn
        self.grid = tuple(int(g) for g in visual.grid_size)
        self.width = int(visual.transformer.width)
        self.heads = int(attn.num_heads)
        self.num_prefix = 1  # open_clip native ViTs always prepend exactly one CLS token
        self.image_size = tuple(int(s) for s in visual.image_size)
        self.attn_input = block.ln_1
        self.last_block = block
        # Older open_clip runs the stack sequence-first ([L, B, D]); 3.x is batch-first.
        self._batch_first = bool(getattr(visual.transformer, "batch_first", False))

    def batch_first(self, x: Tensor) -> Tensor:
        return x if self._batch_first else x.transpose(0, 1)

    def input_dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, -1)
        return tuple(split_heads(t, self.heads) for t in (q, k, v))

    def attn_scale(self) -> float:
        return (self.width // self.heads) ** -0.5

    def out_proj_weight(self) -> Tensor:
        return self.attn.out_proj.weight

    def layer_scale(self) -> nn.Module:
        return self.block.ls_1

    def final_norm(self) -> nn.LayerNorm | None:
        return self.visual.ln_post

    def to_embedding(self, x: Tensor) -> Tensor:
        proj = self.visual.proj
        return x if proj is None else x @ proj.to(x.dtype)


class TimmViT(_OpenClipTower):
    """open_clip ``TimmModel`` around a timm ``VisionTransformer`` (BiomedCLIP)."""

    def __init__(self, model: nn.Module):
        from timm.layers import Attention as TimmAttention
        from timm.models.vision_transformer import Block, VisionTransformer

        super().__init__(model)
        visual = model.visual
        trunk = visual.trunk
        if not isinstance(trunk, VisionTransformer):
            raise ValueError(
                f"Unsupported teacher: timm trunk {type(trunk).__name__} is not a timm "
                "VisionTransformer (ConvNeXt/ResNet/EVA/... towers have no CLS attention "
                "of this form).")
        if trunk.cls_token is None:
            raise ValueError("Unsupported teacher: the timm ViT has no CLS token "
                             "(class_token=False), so there is no CLS attention row.")
        if trunk.attn_pool is not None or trunk.global_pool != "token":
            raise ValueError(
                f"Unsupported teacher: timm ViT pools with global_pool="
                f"{trunk.global_pool!r}{' + attention pooling' if trunk.attn_pool else ''}; "
                "the CLS attention target needs CLS-token pooling (timm_pool='' or "
                "'token' in the open_clip config, as BiomedCLIP).")
        block = trunk.blocks[-1]
        if type(block) is not Block or not isinstance(block.attn, TimmAttention):
            raise ValueError(
                f"Unsupported teacher: last timm block is {type(block).__name__} with "
                f"{type(block.attn).__name__}; only timm's pre-norm Block with the "
                "standard Attention is supported.")
        self.visual = visual
        self.trunk = trunk
        self.block = block
        self.attn = block.attn
        self.grid = tuple(int(g) for g in trunk.patch_embed.grid_size)
        self.width = int(trunk.embed_dim)
        self.heads = int(self.attn.num_heads)
        self.num_prefix = int(trunk.num_prefix_tokens)  # timm order: CLS, then registers
        # TimmModel does not pass its image_size to timm; the trunk's own size is the truth.
        img_size = trunk.patch_embed.img_size or visual.image_size
        self.image_size = tuple(int(s) for s in img_size)
        self.attn_input = block.norm1
        self.last_block = block

    def input_dtype(self) -> torch.dtype:
        return self.trunk.patch_embed.proj.weight.dtype

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.attn
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def attn_scale(self) -> float:
        return float(self.attn.scale)

    def out_proj_weight(self) -> Tensor:
        if not isinstance(self.attn.norm, nn.Identity) or self.attn.gate is not None:
            raise NotImplementedError(
                "prompt_aware_attention: the timm attention normalises or gates its "
                "output (scale_norm / gated), so per-patch contributions are not linear.")
        return self.attn.proj.weight

    def layer_scale(self) -> nn.Module:
        return self.block.ls1

    def final_norm(self) -> nn.LayerNorm | None:
        norms = [m for m in (self.trunk.norm, self.trunk.fc_norm) if not isinstance(m, nn.Identity)]
        if len(norms) > 1 or (norms and not isinstance(norms[0], nn.LayerNorm)):
            raise NotImplementedError(
                "prompt_aware_attention supports one final LayerNorm on the timm trunk; "
                f"found {[type(m).__name__ for m in norms]}.")
        return norms[0] if norms else None

    def to_embedding(self, x: Tensor) -> Tensor:
        linears = _linear_maps([self.trunk.head, *self.visual.head.children()],
                               "the timm trunk head / open_clip projection head")
        for linear in linears:
            x = x @ linear.weight.to(x.dtype).T
        return x


class HFCLIPVision(Tower):
    """transformers ``CLIPModel`` (PubMedCLIP): ``vision_model`` + ``visual_projection``.

    The CLIP vision encoder is pre-norm like open_clip's: block ``layer_norm1`` feeds the
    attention, ``hidden_states[-1]`` (= the last block's output) comes before
    ``post_layernorm``, and the image embedding is ``visual_projection(post_layernorm(CLS))``.
    """

    def __init__(self, model: nn.Module):
        from transformers.models.clip.modeling_clip import CLIPAttention, CLIPEncoderLayer

        vision = model.vision_model
        block = vision.encoder.layers[-1]
        if not isinstance(block, CLIPEncoderLayer) or not isinstance(block.self_attn, CLIPAttention):
            raise ValueError(f"Unsupported teacher: last CLIP vision layer is {type(block).__name__}; "
                             "a transformers CLIPModel (CLIPEncoderLayer + CLIPAttention) is expected.")
        config = model.config.vision_config
        self.model = model
        self.vision = vision
        self.block = block
        self.attn = block.self_attn
        side = int(config.image_size) // int(config.patch_size)
        self.grid = (side, side)
        self.width = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.num_prefix = 1  # CLIP's class embedding
        self.image_size = (int(config.image_size), int(config.image_size))
        self.attn_input = block.layer_norm1
        self.last_block = block

    def input_dtype(self) -> torch.dtype:
        return self.vision.embeddings.patch_embedding.weight.dtype

    def image_embedding(self, pixel_values: Tensor) -> Tensor:
        pooled = self.vision(pixel_values=pixel_values).pooler_output  # post_layernorm(CLS)
        return self.model.visual_projection(pooled)

    def text_embedding(self, questions: Sequence[str], tokenizer, device) -> Tensor:
        limit = int(self.model.config.text_config.max_position_embeddings)
        tokens = tokenizer(list(questions), padding=True, truncation=True, max_length=limit, return_tensors="pt")
        text = self.model.text_model(input_ids=tokens["input_ids"].to(device),
                                     attention_mask=tokens["attention_mask"].to(device))
        return F.normalize(self.model.text_projection(text.pooler_output).float(), dim=-1)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        attn = self.attn
        return tuple(split_heads(proj(x), self.heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))

    def attn_scale(self) -> float:
        return float(self.attn.scale)

    def out_proj_weight(self) -> Tensor:
        return self.attn.out_proj.weight

    def final_norm(self) -> nn.LayerNorm | None:
        return self.vision.post_layernorm

    def to_embedding(self, x: Tensor) -> Tensor:
        return x @ self.model.visual_projection.weight.to(x.dtype).T


def tower_for(model: nn.Module) -> Tower:
    """The adapter for ``model`` (open_clip CLIP / CustomTextCLIP, or transformers CLIPModel)."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if hasattr(model, "vision_model") and hasattr(model, "visual_projection"):
        return HFCLIPVision(model)
    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer):
        return NativeViT(model)
    if isinstance(visual, TimmModel):
        return TimmViT(model)
    raise ValueError(
        f"Unsupported teacher vision tower {type(visual).__name__}: MedAlign targets need a "
        "ViT with a CLS token (open_clip VisionTransformer, a timm VisionTransformer via "
        "TimmModel, or a transformers CLIPModel); ResNet/ConvNeXt/attention-pooled towers "
        "are not supported.")
