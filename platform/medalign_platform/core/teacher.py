"""The frozen expert CLIP teacher and the MedAlign teacher targets it produces.

Per image the teacher yields (see ``/work/shared/method.md``, "Teacher targets"):

* patch tokens: output of the vision tower's LAST transformer block at the patch
  positions (CLS and any other prefix tokens dropped), before the final LayerNorm and
  projection, ``[h*w, D_t]``;
* CLS attention: the last block's attention probabilities, averaged over heads, CLS
  query row, prefix key columns dropped, ``[h*w]`` (raw probabilities, no max-division).

Both are read with forward hooks on the unmodified open_clip model: one on the last
block's pre-attention norm (its output is the attention input, from which the CLS row of
softmax(q k^T * scale) is recomputed with the block's own weights) and one on the last
block (its output). Two vision towers are supported:

* open_clip's native ``VisionTransformer`` (OpenAI CLIP, UniMed-CLIP);
* open_clip's ``TimmModel`` wrapping a timm ``VisionTransformer`` (BiomedCLIP).

Every loading route goes through ``open_clip.create_model_and_transforms``:
``"hf-hub:org/repo"``, ``"local-dir:/path"``, or a config name plus
``pretrained=<tag or checkpoint file>``.

(This module is longer than 600 lines because it holds both tower adapters beside the
teacher; they move to their own module with the third adapter, issue #11.)
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

__all__ = ["ExpertTeacher", "TeacherOutputs", "load_teacher"]

# Part of every teacher identity: bump it when the target definition changes so caches
# built with the old definition stop matching.
_TARGETS_VERSION = "medalign-teacher-targets/v1:last-block-pre-norm,cls-row-head-mean"


@dataclass
class TeacherOutputs:
    """Teacher targets for a batch of images.

    Attributes:
        patch_tokens: ``[B, h*w, D_t]`` last-block output at patch positions (row-major
            over the ``grid``), before the final norm / projection.
        cls_attention: ``[B, h*w]`` last-block CLS-query attention probabilities,
            averaged over heads, prefix columns dropped (so rows sum to <= 1).
        grid: ``(h, w)`` native patch grid of the teacher.
    """

    patch_tokens: Tensor
    cls_attention: Tensor
    grid: tuple[int, int]

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "TeacherOutputs":
        """Returns a copy with both tensors moved to ``device`` and/or cast to ``dtype``."""
        return TeacherOutputs(
            patch_tokens=self.patch_tokens.to(device=device, dtype=dtype),
            cls_attention=self.cls_attention.to(device=device, dtype=dtype),
            grid=self.grid,
        )

    def __len__(self) -> int:
        return self.patch_tokens.shape[0]


# --------------------------------------------------------------------------- towers


def _split_heads(x: Tensor, heads: int) -> Tensor:
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


class _Tower:
    """What the teacher needs from one vision-tower implementation.

    Attributes:
        grid: ``(h, w)`` native patch grid.
        width: D_t.
        heads: number of attention heads of the last block.
        num_prefix: number of prefix tokens (CLS first, then e.g. registers).
        image_size: ``(S_h, S_w)`` expected input size.
        attn_input: module whose output is the last block's attention input.
        last_block: the last transformer block.
    """

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
        raise NotImplementedError

    def final_norm(self) -> nn.LayerNorm | None:
        raise NotImplementedError

    def to_embedding(self, x: Tensor) -> Tensor:
        """Linear part of the map from the normed CLS token to the joint space,
        ``[..., D] -> [..., E]``."""
        raise NotImplementedError


class _NativeViT(_Tower):
    """open_clip ``VisionTransformer`` with ``nn.MultiheadAttention`` blocks."""

    def __init__(self, visual: nn.Module):
        from open_clip.transformer import ResidualAttentionBlock

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
        return tuple(_split_heads(t, self.heads) for t in (q, k, v))

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


class _TimmViT(_Tower):
    """open_clip ``TimmModel`` around a timm ``VisionTransformer`` (BiomedCLIP)."""

    def __init__(self, visual: nn.Module):
        from timm.layers import Attention as TimmAttention
        from timm.models.vision_transformer import Block, VisionTransformer

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


def _tower_for(model: nn.Module) -> _Tower:
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if isinstance(visual, VisionTransformer):
        return _NativeViT(visual)
    if isinstance(visual, TimmModel):
        return _TimmViT(visual)
    raise ValueError(
        f"Unsupported teacher vision tower {type(visual).__name__}: MedAlign targets need a "
        "ViT with a CLS token (open_clip VisionTransformer or a timm VisionTransformer "
        "via TimmModel); ResNet/ConvNeXt/attention-pooled towers are not supported.")


# ------------------------------------------------------------------------- identity


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        # Raw bytes (works for bf16 too): a uint8 view has numpy's buffer protocol.
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _teacher_identity(model: nn.Module) -> str:
    """sha256 over the target recipe, the vision architecture, the preprocessing and all
    weights. File paths and model names are deliberately left out: the same weights
    loaded from another directory (another trial, another machine) or by another route
    (local-dir vs name + checkpoint file) must share cached targets, while anything that
    changes the targets (a weight, QuickGELU vs GELU, mean/std, image size) changes it."""
    h = hashlib.sha256()
    h.update(_TARGETS_VERSION.encode())
    # repr names every layer and its hyper-parameters, including the activation class.
    h.update(repr(model.visual).encode())
    preprocess_cfg = getattr(model.visual, "preprocess_cfg", {})
    h.update(json.dumps(preprocess_cfg, sort_keys=True, default=str).encode())
    h.update(_weights_digest(model).encode())
    return h.hexdigest()


# -------------------------------------------------------------------------- teacher


class ExpertTeacher(nn.Module):
    """A frozen open_clip expert CLIP that produces MedAlign teacher targets.

    Attributes:
        model: the open_clip CLIP model (eval mode, no gradients).
        preprocess: open_clip's eval transform, ``PIL.Image -> [3, S, S]``.
        tokenizer: ``open_clip.get_tokenizer(model_name)``; ``list[str] -> [B, T]``.
        grid: ``(h, w)`` native patch grid, e.g. ``(14, 14)`` for ViT-B/16 @ 224.
        width: D_t, width of the vision transformer.
        identity: 64-hex sha256 fingerprint of everything that determines the targets
            (see ``_teacher_identity``); the teacher part of target-cache keys.
        source: ``"<model_name>|<pretrained>"`` for logs (not part of ``identity``).
    """

    def __init__(self, model: nn.Module, preprocess, tokenizer, *, source: str = ""):
        super().__init__()
        self._tower = _tower_for(model)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.source = source
        self.grid: tuple[int, int] = self._tower.grid
        self.width: int = self._tower.width
        self.image_size: tuple[int, int] = self._tower.image_size
        self.identity: str = _teacher_identity(model)

    def train(self, mode: bool = True) -> "ExpertTeacher":
        # Frozen teacher: stay in eval (patch dropout, dropout) whatever the caller does.
        return super().train(False)

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half() change the weights' bytes and hence the targets: keep the
        # identity honest. Pure device moves keep it (same bytes).
        dtype = self.dtype
        out = super()._apply(fn, recurse)
        if self.dtype != dtype:
            self.identity = _teacher_identity(self.model)
        return out

    @property
    def device(self) -> torch.device:
        return next(self.model.visual.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the vision tower (dtype of its patch-embedding weights)."""
        return self._tower.input_dtype()

    @contextmanager
    def _capture(self) -> Iterator[dict[str, Tensor]]:
        """Hooks the last block; yields a dict filled with ``attn_in`` and ``block_out``
        (both ``[B, L, D]``) by the next vision forward."""
        tower, store, owner = self._tower, {}, threading.get_ident()

        def keep(key):
            def hook(_module, _inputs, output):
                # Hooks are per module, not per call: ignore forwards that other threads
                # run through the same teacher at the same time.
                if threading.get_ident() == owner:
                    store[key] = tower.batch_first(output)
            return hook

        handles = [tower.attn_input.register_forward_hook(keep("attn_in")),
                   tower.last_block.register_forward_hook(keep("block_out"))]
        try:
            yield store
        finally:
            for handle in handles:
                handle.remove()

    def _run(self, pixel_values: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Vision forward with hooks; returns (captured tensors, image embedding [B, E])."""
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != self.image_size:
            raise ValueError(
                f"pixel_values must be [B, 3, {self.image_size[0]}, {self.image_size[1]}] "
                f"(the teacher's native size); got {list(pixel_values.shape)}. Use "
                "teacher.preprocess / encode_images on PIL images.")
        x = pixel_values.to(device=self.device, dtype=self.dtype)
        with self._capture() as store:
            embedding = self.model.visual(x)
        if isinstance(embedding, tuple):  # output_tokens=True towers return (pooled, tokens)
            embedding = embedding[0]
        return store, embedding

    def _cls_attention_heads(self, attn_in: Tensor) -> Tensor:
        """``[B, L, D]`` attention input -> ``[B, H, L]`` CLS-query probabilities (fp32).

        Only the CLS query row of softmax(q k^T * scale) is formed: it is all the target
        needs, and it is O(L) instead of O(L^2)."""
        q, k, _ = self._tower.qkv(attn_in)
        logits = (q[:, :, :1].float() * self._tower.attn_scale()) @ k.float().transpose(-1, -2)
        return logits.squeeze(2).softmax(dim=-1)

    @torch.no_grad()
    def encode(self, pixel_values: Tensor) -> TeacherOutputs:
        """Teacher targets for preprocessed images.

        Args:
            pixel_values: ``[B, 3, S, S]`` as produced by ``preprocess``.

        Returns:
            ``TeacherOutputs`` in float32 on the teacher's device: ``patch_tokens``
            ``[B, h*w, D_t]``, ``cls_attention`` ``[B, h*w]``.
        """
        store, _ = self._run(pixel_values)
        p = self._tower.num_prefix
        probs = self._cls_attention_heads(store["attn_in"])  # [B, H, L]
        block_out = store["block_out"]
        h, w = self.grid
        if block_out.shape[1] - p != h * w:
            raise RuntimeError(f"expected {h * w} patch tokens for grid {self.grid}, got "
                               f"{block_out.shape[1] - p}")
        return TeacherOutputs(
            patch_tokens=block_out[:, p:].float().contiguous(),
            cls_attention=probs.mean(dim=1)[:, p:].contiguous(),
            grid=self.grid,
        )

    def forward(self, pixel_values: Tensor) -> TeacherOutputs:
        return self.encode(pixel_values)

    def pixel_values(self, images: Sequence[Image.Image]) -> Tensor:
        """``list[PIL.Image] -> [B, 3, S, S]`` with the teacher's eval transform."""
        return torch.stack([self.preprocess(image) for image in images])

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image],
                      batch_size: int | None = None) -> TeacherOutputs:
        """``encode`` for PIL images: applies ``preprocess`` and runs in batches.

        Args:
            images: PIL images (any mode; the transform converts to RGB).
            batch_size: images per forward; ``None`` = all at once.

        Returns:
            ``TeacherOutputs`` for the images, in input order.
        """
        if not images:
            raise ValueError("encode_images needs at least one image")
        step = batch_size or len(images)
        parts = [self.encode(self.pixel_values(images[i:i + step]))
                 for i in range(0, len(images), step)]
        return TeacherOutputs(
            patch_tokens=torch.cat([o.patch_tokens for o in parts]),
            cls_attention=torch.cat([o.cls_attention for o in parts]),
            grid=self.grid,
        )

    @torch.no_grad()
    def encode_questions(self, questions: Sequence[str]) -> Tensor:
        """``list[str] -> [B, E]`` L2-normalised text embeddings (fp32)."""
        tokens = self.tokenizer(list(questions)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()

    def _cls_patch_contributions(self, attn_in: Tensor, probs: Tensor) -> Tensor:
        """Per-token share of the last block's attention output at the CLS position.

        Args:
            attn_in: ``[B, L, D]`` attention input (output of the pre-attention norm).
            probs: ``[B, H, L]`` CLS-query attention probabilities.

        Returns:
            ``[B, L, D]`` fp32 ``c_j = W_o concat_h(a_{h,j} v_{h,j})``; summed over all L
            tokens plus the out-projection bias this is exactly the attention output at
            CLS.
        """
        _, _, v = self._tower.qkv(attn_in)  # [B, H, L, hd]
        weighted = probs.unsqueeze(-1) * v.float()  # [B, H, L, hd]
        b, heads, n, hd = weighted.shape
        weighted = weighted.transpose(1, 2).reshape(b, n, heads * hd)
        return weighted @ self._tower.out_proj_weight().float().T

    @torch.no_grad()
    def prompt_aware_attention(self, pixel_values: Tensor, questions: Sequence[str]) -> Tensor:
        """Question-conditioned attention map over the patches.

        For image b with question text embedding t (L2-normalised, ``encode_text``),
        CLS-query probabilities a_{h,j} and per-head values v_{h,j} of the last block:

            c_j   = gamma_ls * W_o concat_h(a_{h,j} v_{h,j})     (patch j's share of the
                                                                 attention output at CLS)
            n_j   = g * (c_j - mean(c_j)) / sigma_cls             (final LayerNorm,
                                                                 linearised at the CLS
                                                                 token's statistics)
            e_j   = P^T n_j                                       (projection to the joint
                                                                 space)
            s_j   = max(0, <e_j, t>) / ||e_cls||

        where W_o is the attention output projection, gamma_ls the block's layer scale
        (1 if none), g the final norm's weight (``ln_post``; timm: ``trunk.norm``),
        sigma_cls = sqrt(Var(x_cls) + eps) of the CLS token's last-block output, P the
        image projection (timm: the head's linear layers) and e_cls the image embedding.
        Additive biases (out-proj bias, LN bias) are shared by all patches and dropped.
        Dividing by ||e_cls|| makes sum_j <e_j, t> / ||e_cls|| the patches' share of the
        image-text cosine that flows through the last attention; it does not change the
        map's shape. Values are raw (no max-division), like ``cls_attention``.

        Args:
            pixel_values: ``[B, 3, S, S]`` preprocessed images.
            questions: B question strings, one per image.

        Returns:
            ``[B, h*w]`` fp32, non-negative.

        Raises:
            NotImplementedError: for timm towers whose attention output or head is not
                linear (gated/normed attention, MLP projection head).
        """
        if len(questions) != pixel_values.shape[0]:
            raise ValueError(f"need one question per image: {len(questions)} questions "
                             f"for {pixel_values.shape[0]} images")
        tower = self._tower
        store, embedding = self._run(pixel_values)
        probs = self._cls_attention_heads(store["attn_in"])
        p = tower.num_prefix
        contrib = self._cls_patch_contributions(store["attn_in"], probs)[:, p:]  # [B, N, D]
        contrib = tower.layer_scale()(contrib)
        norm = tower.final_norm()
        if norm is not None:
            cls = store["block_out"][:, 0].float()
            sigma = torch.sqrt(cls.var(dim=-1, unbiased=False) + norm.eps)  # [B]
            contrib = contrib - contrib.mean(dim=-1, keepdim=True)
            if norm.weight is not None:
                contrib = contrib * norm.weight.float()
            contrib = contrib / sigma[:, None, None]
        patch_embed = tower.to_embedding(contrib)  # [B, N, E]
        text = self.encode_questions(questions)  # [B, E]
        scores = torch.einsum("bne,be->bn", patch_embed, text)
        return scores.clamp_min(0) / embedding.float().norm(dim=-1, keepdim=True)


# -------------------------------------------------------------------------- loading


def _check_source(model_name: str, pretrained: str | None) -> None:
    """Turns open_clip's generic failures for missing files into actionable errors."""
    if model_name.startswith("local-dir:"):
        path = model_name[len("local-dir:"):]
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"teacher directory not found: {path!r} (from model_name={model_name!r}). "
                "Point local-dir: at a folder holding open_clip_config.json and "
                "open_clip_model.safetensors.")
        if not os.path.isfile(os.path.join(path, "open_clip_config.json")):
            raise FileNotFoundError(
                f"{path!r} has no open_clip_config.json; it is not an open_clip local-dir "
                "export (write one with {'model_cfg': ..., 'preprocess_cfg': ...}).")
    if pretrained is None:
        return
    if model_name.startswith(("local-dir:", "hf-hub:")):
        raise ValueError(
            f"pretrained={pretrained!r} would be ignored: {model_name!r} already names its "
            "weights. Drop `pretrained`, or use a config name (e.g. 'ViT-B-16') with "
            "pretrained=<checkpoint file>.")
    if os.path.isfile(pretrained):
        return
    name = model_name.replace("/", "-")
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return
    raise FileNotFoundError(
        f"teacher checkpoint not found: pretrained={pretrained!r} is neither an existing "
        f"file nor a known open_clip tag for {model_name!r} (tags: {tags or 'none'}). "
        "Fix the path (e.g. the UniMed-CLIP .pt/.safetensors file) or the tag.")


def load_teacher(model_name: str, pretrained: str | None = None, *,
                 device: torch.device | str = "cpu", precision: str = "fp32") -> ExpertTeacher:
    """Loads a frozen expert CLIP teacher through ``open_clip.create_model_and_transforms``.

    Args:
        model_name: ``"hf-hub:org/repo"`` (BiomedCLIP), ``"local-dir:/path"``, or an
            open_clip config name (built-in or registered with
            ``open_clip.add_model_config``), e.g. ``"ViT-B-16-quickgelu"`` for UniMed-CLIP.
        pretrained: for config names only: a checkpoint file or an open_clip tag.
        device: device to load onto.
        precision: open_clip precision ("fp32", "fp16", "bf16", ...).

    Returns:
        An ``ExpertTeacher`` in eval mode with ``requires_grad=False`` everywhere.

    Raises:
        FileNotFoundError: missing local-dir or checkpoint file.
        ValueError: ``pretrained`` given with a schema name, or an unsupported tower.
    """
    import open_clip  # here, not at the top: the cache and the targets' types need no open_clip

    _check_source(model_name, pretrained)
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, precision=precision)
    tokenizer = open_clip.get_tokenizer(model_name)
    return ExpertTeacher(model, preprocess, tokenizer, source=f"{model_name}|{pretrained}")
