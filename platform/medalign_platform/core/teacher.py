"""The frozen expert CLIP teacher and the MedAlign teacher targets it produces.

Per image the teacher yields (see ``/work/shared/method.md``, "Teacher targets"):

* patch tokens: output of the vision tower's LAST transformer block at the patch
  positions (CLS and any other prefix tokens dropped), before the final LayerNorm and
  projection, ``[h*w, D_t]``;
* CLS attention: the last block's attention probabilities, averaged over heads, CLS
  query row, prefix key columns dropped, ``[h*w]`` (raw probabilities, no max-division).

Both are read with forward hooks on the unmodified model: one on the last block's
pre-attention norm (its output is the attention input, from which the CLS row of
softmax(q k^T * scale) is recomputed with the block's own weights) and one on the last
block (its output). The vision-tower families (open_clip native ViT, open_clip + timm ViT,
transformers ``CLIPModel``) are adapters in :mod:`medalign_platform.core.towers`.

Loading routes (:func:`load_teacher`):

* open_clip: ``"hf-hub:org/repo"`` (BiomedCLIP), ``"local-dir:/path"`` (what
  ``medalign convert unimed-clip`` writes), or a config name plus
  ``pretrained=<tag or checkpoint file>``;
* transformers: ``"hf-clip:/path/or/hub-id"`` for a ``CLIPModel`` with its processor
  (PubMedCLIP).

Prompt-aware attention (:meth:`ExpertTeacher.prompt_aware_attention`) conditions the map on
a question through the text tower; teachers exported without a text tower
(``open_clip_config.json`` with ``"medalign": {"text_tower": "absent"}``) refuse it.
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
from PIL import Image
from torch import Tensor, nn

from .towers import tower_for

__all__ = ["ExpertTeacher", "TeacherOutputs", "load_teacher", "HF_CLIP_PREFIX", "LOCAL_DIR_PREFIX"]

#: ``teacher.name`` prefix of a transformers ``CLIPModel`` teacher (PubMedCLIP).
HF_CLIP_PREFIX = "hf-clip:"
#: ``teacher.name`` prefix of an open_clip export folder (open_clip_config.json + weights): open_clip's own schema.
LOCAL_DIR_PREFIX = "local-dir:"

# Part of every teacher identity: bump it when the target definition changes so caches
# built with the old definition stop matching.
_TARGETS_VERSION = "medalign-teacher-targets/v1:last-block-pre-norm,cls-row-head-mean"
# The same for the question-conditioned map (part of ``prompt_identity``).
_PROMPT_AWARE_VERSION = "medalign-prompt-aware/v1:cls-contribution-x-text,clamp0,over-image-norm"


@dataclass
class TeacherOutputs:
    """Teacher targets for a batch of images.

    Attributes:
        patch_tokens: ``[B, h*w, D_t]`` last-block output at patch positions (row-major
            over the ``grid``), before the final norm / projection.
        cls_attention: ``[B, h*w]`` last-block CLS-query attention probabilities,
            averaged over heads, prefix columns dropped (so rows sum to <= 1).
        grid: ``(h, w)`` native patch grid of the teacher.
        prompt_attention: optional ``[B, h*w]`` question-conditioned map
            (``teacher.attention: prompt_aware``); when set it is the attention target.
    """

    patch_tokens: Tensor
    cls_attention: Tensor
    grid: tuple[int, int]
    prompt_attention: Tensor | None = None

    @property
    def attention(self) -> Tensor:
        """The attention target: ``prompt_attention`` when present, else ``cls_attention``."""
        return self.prompt_attention if self.prompt_attention is not None else self.cls_attention

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> "TeacherOutputs":
        """Returns a copy with the tensors moved to ``device`` and/or cast to ``dtype``."""
        prompt = self.prompt_attention
        return TeacherOutputs(
            patch_tokens=self.patch_tokens.to(device=device, dtype=dtype),
            cls_attention=self.cls_attention.to(device=device, dtype=dtype),
            grid=self.grid,
            prompt_attention=None if prompt is None else prompt.to(device=device, dtype=dtype),
        )

    def __len__(self) -> int:
        return self.patch_tokens.shape[0]


# ------------------------------------------------------------------------- identity


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        # Raw bytes (works for bf16 too): a uint8 view has numpy's buffer protocol.
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _teacher_identity(model: nn.Module, vision: nn.Module, preprocess_cfg: dict) -> str:
    """sha256 over the target recipe, the vision architecture, the preprocessing and all
    weights. File paths and model names are deliberately left out: the same weights
    loaded from another directory (another trial, another machine) or by another route
    (local-dir vs name + checkpoint file) must share cached targets, while anything that
    changes the targets (a weight, QuickGELU vs GELU, mean/std, image size) changes it."""
    h = hashlib.sha256()
    h.update(_TARGETS_VERSION.encode())
    # repr names every layer and its hyper-parameters, including the activation class.
    h.update(repr(vision).encode())
    h.update(json.dumps(preprocess_cfg, sort_keys=True, default=str).encode())
    h.update(_weights_digest(model).encode())
    return h.hexdigest()


# -------------------------------------------------------------------------- teacher


def _tokenizer_description(tokenizer) -> str:
    """What identifies a tokenizer's behaviour well enough for cache keys (no file paths)."""
    if tokenizer is None:
        return "none"
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # open_clip HFTokenizer wraps an HF one
    parts = [type(tokenizer).__name__, type(inner).__name__,
             str(getattr(tokenizer, "context_length", "")), str(len(inner) if hasattr(inner, "__len__") else "")]
    vocab = getattr(inner, "get_vocab", None)
    if callable(vocab):
        parts.append(hashlib.sha256(json.dumps(sorted(vocab().items())).encode()).hexdigest())
    return "|".join(parts)


class ExpertTeacher(nn.Module):
    """A frozen expert CLIP (open_clip or transformers) that produces MedAlign teacher targets.

    Attributes:
        model: the open_clip CLIP or transformers ``CLIPModel`` (eval mode, no gradients).
        preprocess: eval transform, ``PIL.Image -> [3, S, S]``.
        tokenizer: the text tower's tokenizer (open_clip: ``list[str] -> [B, T]``;
            transformers: a ``PreTrainedTokenizer``), or None.
        grid: ``(h, w)`` native patch grid, e.g. ``(14, 14)`` for ViT-B/16 @ 224.
        width: D_t, width of the vision transformer.
        identity: 64-hex sha256 fingerprint of everything that determines the targets
            (see ``_teacher_identity``); the teacher part of target-cache keys.
        has_text: whether a real text tower is present (prompt-aware attention needs it).
        source: ``"<model_name>|<pretrained>"`` for logs (not part of ``identity``).

    Args:
        model, preprocess, tokenizer: as above.
        source: for logs.
        preprocess_config: what defines ``preprocess`` (mean/std, size, ...); part of the
            identity. Default: open_clip's ``model.visual.preprocess_cfg``.
        has_text: False for exports whose text tower is a placeholder.
    """

    def __init__(self, model: nn.Module, preprocess, tokenizer, *, source: str = "",
                 preprocess_config: dict | None = None, has_text: bool = True):
        super().__init__()
        self._tower = tower_for(model)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.source = source
        self.has_text = bool(has_text and tokenizer is not None)
        self._preprocess_config = (preprocess_config if preprocess_config is not None
                                   else getattr(self._tower.vision, "preprocess_cfg", {}))
        self.grid: tuple[int, int] = self._tower.grid
        self.width: int = self._tower.width
        self.image_size: tuple[int, int] = self._tower.image_size
        self.identity: str = self._identity()

    def _identity(self) -> str:
        return _teacher_identity(self.model, self._tower.vision, self._preprocess_config)

    @property
    def prompt_identity(self) -> str:
        """Fingerprint of the question-conditioned map: the target identity (all weights,
        the text tower's included), the prompt-aware recipe and the tokenizer."""
        h = hashlib.sha256()
        for part in (self.identity, _PROMPT_AWARE_VERSION, _tokenizer_description(self.tokenizer)):
            h.update(part.encode() + b"\n")
        return h.hexdigest()

    def train(self, mode: bool = True) -> "ExpertTeacher":
        # Frozen teacher: stay in eval (patch dropout, dropout) whatever the caller does.
        return super().train(False)

    def _apply(self, fn, recurse=True):
        # .to(dtype)/.half() change the weights' bytes and hence the targets: keep the
        # identity honest. Pure device moves keep it (same bytes).
        dtype = self.dtype
        out = super()._apply(fn, recurse)
        if self.dtype != dtype:
            self.identity = self._identity()
        return out

    @property
    def device(self) -> torch.device:
        return next(self._tower.vision.parameters()).device

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
                    if isinstance(output, tuple):  # older transformers layers return tuples
                        output = output[0]
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
            embedding = self._tower.image_embedding(x)
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
        if not self.has_text:
            raise ValueError(
                f"teacher {self.source or '(unnamed)'} has no text tower (it was exported vision-only), so "
                "question embeddings and prompt-aware attention are unavailable; set teacher.attention=cls, or "
                "re-run `medalign convert unimed-clip ... --text-encoder DIR` with the text encoder's files.")
        return self._tower.text_embedding(questions, self.tokenizer, self.device)

    @torch.no_grad()
    def encode_prompt_aware(self, images: Sequence[Image.Image], questions: Sequence[str],
                            batch_size: int | None = None) -> Tensor:
        """:meth:`prompt_aware_attention` for PIL images, in batches.

        This (with ``identity``, ``prompt_identity``, ``grid`` and ``width``) is what
        :class:`~medalign_platform.core.target_cache.TargetCache` calls for per-question
        targets; any teacher object with these members can use the cache.

        Returns:
            ``[B, h*w]`` fp32, non-negative, in input order.
        """
        if len(images) != len(questions):
            raise ValueError(f"need one question per image: {len(questions)} questions for {len(images)} images")
        if not images:
            raise ValueError("encode_prompt_aware needs at least one image")
        step = batch_size or len(images)
        return torch.cat([self.prompt_aware_attention(self.pixel_values(images[i:i + step]),
                                                      list(questions[i:i + step]))
                          for i in range(0, len(images), step)])

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
        text = self.encode_questions(questions)  # [B, E]; fails first for vision-only exports
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
        scores = torch.einsum("bne,be->bn", patch_embed, text)
        return scores.clamp_min(0) / embedding.float().norm(dim=-1, keepdim=True)


# -------------------------------------------------------------------------- loading


def _check_source(model_name: str, pretrained: str | None) -> None:
    """Turns open_clip's generic failures for missing files into actionable errors."""
    if model_name.startswith(LOCAL_DIR_PREFIX):
        path = model_name[len(LOCAL_DIR_PREFIX):]
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
    if model_name.startswith((LOCAL_DIR_PREFIX, "hf-hub:")):
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


def _local_dir_extras(model_name: str) -> dict:
    """The ``"medalign"`` section of a local-dir's ``open_clip_config.json`` (written by
    ``medalign convert``); ``{}`` for other sources."""
    if not model_name.startswith(LOCAL_DIR_PREFIX):
        return {}
    config = json.loads(open(os.path.join(model_name[len(LOCAL_DIR_PREFIX):], "open_clip_config.json")).read())
    return dict(config.get("medalign") or {})


def _load_hf_clip(source: str, device, precision: str) -> ExpertTeacher:
    """A transformers ``CLIPModel`` directory or hub id (PubMedCLIP) with its processor."""
    from transformers import AutoProcessor, CLIPModel

    local = os.path.expanduser(source)
    if source.startswith((".", "/", "~")) and not os.path.isfile(os.path.join(local, "config.json")):
        raise FileNotFoundError(
            f"teacher directory not found or not a transformers checkpoint: {source!r} has no config.json. "
            f"Point teacher.name={HF_CLIP_PREFIX}DIR at a CLIPModel save_pretrained folder "
            "(e.g. flaviagiammarino/pubmed-clip-vit-base-patch32 downloaded).")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"precision={precision!r} for a transformers teacher; choose one of {sorted(dtypes)}")
    path = local if os.path.isdir(local) else source
    model = CLIPModel.from_pretrained(path, dtype=dtypes[precision]).to(device)
    processor = AutoProcessor.from_pretrained(path)
    image_processor = processor.image_processor

    def preprocess(image: Image.Image) -> Tensor:
        return image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]

    return ExpertTeacher(model, preprocess, processor.tokenizer, source=f"{HF_CLIP_PREFIX}{source}",
                         preprocess_config=image_processor.to_dict())


def load_teacher(model_name: str, pretrained: str | None = None, *,
                 device: torch.device | str = "cpu", precision: str = "fp32") -> ExpertTeacher:
    """Loads a frozen expert CLIP teacher (open_clip or transformers).

    Args:
        model_name: ``"hf-hub:org/repo"`` (BiomedCLIP), ``"local-dir:/path"`` (e.g. a
            converted UniMed-CLIP), an open_clip config name (built-in or registered with
            ``open_clip.add_model_config``) such as ``"ViT-B-16-quickgelu"``, or
            ``"hf-clip:/path/or/id"`` for a transformers ``CLIPModel`` (PubMedCLIP).
        pretrained: for open_clip config names only: a checkpoint file or an open_clip tag.
        device: device to load onto.
        precision: "fp32", "fp16" or "bf16" (open_clip also accepts its mixed precisions).

    Returns:
        An ``ExpertTeacher`` in eval mode with ``requires_grad=False`` everywhere.

    Raises:
        FileNotFoundError: missing local-dir, checkpoint file or transformers folder.
        ValueError: ``pretrained`` given with a schema name, or an unsupported tower.
    """
    if model_name.startswith(HF_CLIP_PREFIX):
        if pretrained is not None:
            raise ValueError(f"pretrained={pretrained!r} would be ignored: {model_name!r} already names its weights")
        return _load_hf_clip(model_name[len(HF_CLIP_PREFIX):], device, precision)
    import open_clip  # here, not at the top: the cache and the targets' types need no open_clip

    _check_source(model_name, pretrained)
    extras = _local_dir_extras(model_name)
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, precision=precision)
    has_text = extras.get("text_tower", "present") != "absent"
    tokenizer = open_clip.get_tokenizer(model_name) if has_text else None
    return ExpertTeacher(model, preprocess, tokenizer, source=f"{model_name}|{pretrained}", has_text=has_text)
