"""The student Med-LVLM: loading, LoRA, the steer adapter and the layer-L distillation tap.

The student is any LLaVA-family model that transformers loads as
``LlavaForConditionalGeneration`` / ``AutoModelForImageTextToText``. MedAlign needs two
quantities at one decoder layer ``L`` (0-based HF index):

* the visual-span hidden states at the *input* of block ``L`` (HF ``hidden_states[L]``),
* block ``L``'s attention probabilities from the prompt's text tokens to the visual span.

Both are captured by one forward pre-hook on block ``L`` (:class:`DistillationTap`). The
attention probabilities are recomputed for that one layer from its own q/k projections and
rotary embeddings, so the model keeps SDPA (or flash) attention everywhere and never
materialises ``[B, heads, T, T]`` for all layers the way ``output_attentions=True`` does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# LoRA goes on every linear layer of the LLM's decoder blocks, as in the original runs.
LLM_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100


@dataclass
class LoraSettings:
    """LoRA on the language model's linear layers (never the vision tower or projector)."""

    rank: int = field(default=32, metadata={"help": "LoRA rank r (>= 1)."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: tuple[str, ...] = field(
        default=LLM_LINEAR_MODULES,
        metadata={"help": "Names of the decoder-block linear layers that get LoRA."},
    )
    layers_to_transform: list[int] | None = field(
        default=None, metadata={"help": "Decoder layer indices that get LoRA; None means all layers."}
    )

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.target_modules) - set(LLM_LINEAR_MODULES)
        if unknown:
            raise ValueError(f"lora.target_modules has unknown names {sorted(unknown)}; choose from {LLM_LINEAR_MODULES}")


@dataclass
class SteerSettings:
    """Optional steer adapter on the visual span at the input of block L.

    ``E_v <- E_v + eps * E_v @ W^T`` with ``W`` zero-initialised, so training starts from
    the base model. ``mode="full"`` learns a full ``D x D`` matrix (the original: 16.8M
    parameters at D=4096); ``mode="low_rank"`` learns ``W = B @ A`` of rank ``rank``.
    """

    mode: Literal["off", "full", "low_rank"] = field(
        default="off", metadata={"help": "off | full | low_rank."}
    )
    rank: int = field(default=64, metadata={"help": "Rank of W = B @ A when mode=low_rank."})
    eps: float = field(default=1.0, metadata={"help": "Scale of the steer update."})

    def __post_init__(self) -> None:
        if self.mode not in ("off", "full", "low_rank"):
            raise ValueError(f"steer.mode must be off, full or low_rank, got {self.mode!r}")
        if self.mode == "low_rank" and self.rank < 1:
            raise ValueError(f"steer.rank must be >= 1 for mode=low_rank, got {self.rank}")


# --------------------------------------------------------------------------- loading


def load_student(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
):
    """Loads a LLaVA-family student and its processor with transformers.

    Args:
        path_or_id: a directory written by ``save_pretrained`` or a hub id (hub ids need
            the files in the local HF cache when ``HF_HUB_OFFLINE=1``).
        dtype: parameter dtype (``torch.bfloat16`` on GPU).
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flash_attention_2"``.
        device: where to put the model.

    Returns:
        ``(model, processor)``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    local = Path(path_or_id).expanduser()
    if (str(path_or_id).startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"student checkpoint {str(path_or_id)!r} has no config.json; point model.path at a directory "
            "written by save_pretrained (or build one with medalign_platform.tiny.tiny_student)."
        )
    source = str(local) if local.exists() else str(path_or_id)
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(source)
    if device is not None:
        model.to(device)
    return model, processor


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``model.dtype`` (``float32`` | ``bfloat16`` | ``float16``) as a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_expected_layout(model: nn.Module, *, grid=None, vision_feature_layer=None) -> None:
    """Checks a preset's declared ``model.grid`` / ``model.vision_feature_layer`` against the
    loaded checkpoint (``None`` skips a check), so a preset never silently runs another model."""
    actual = visual_grid(model)
    if grid is not None and tuple(grid) != actual:
        raise ValueError(f"model.grid={list(grid)} but the checkpoint's vision tower gives a {actual[0]}x{actual[1]} "
                         "grid; fix model.grid (or set it to null) or model.path")
    layer = getattr(base_model(model).config, "vision_feature_layer", None)
    if vision_feature_layer is not None and layer != vision_feature_layer:
        raise ValueError(f"model.vision_feature_layer={vision_feature_layer} but the checkpoint uses {layer}; "
                         "fix the preset (or set it to null)")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of the decoder blocks (``trainer.gradient_checkpointing``).

    The distillation tap's pre-hook on block L runs again during the recomputation, which
    re-applies the steer adapter exactly as in the forward pass.
    """
    root = base_model(model)
    enable = getattr(root, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        root.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under an optional peft wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def language_model(model: nn.Module) -> nn.Module:
    """The LLM decoder (the module holding ``layers``) of a LLaVA-family model."""
    root = base_model(model)
    for path in ("model.language_model", "language_model.model", "language_model"):
        try:
            module = root.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module
    raise TypeError(f"{type(root).__name__} has no language_model with decoder layers; is it a LLaVA-family model?")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return language_model(model).layers


def validate_layer(model: nn.Module, layer: int) -> int:
    """Checks that ``layer`` is a valid distillation layer (1 .. depth-1) and returns it."""
    depth = len(decoder_layers(model))
    if not isinstance(layer, int) or isinstance(layer, bool) or not 1 <= layer <= depth - 1:
        raise ValueError(
            f"distill.layer={layer!r} is outside the model: this LLM has {depth} decoder layers, so the "
            f"distillation layer must be an integer in 1..{depth - 1} (0-based HF index)."
        )
    return layer


def visual_grid(model: nn.Module) -> tuple[int, int]:
    """The student's visual token grid ``(H, W)`` from its vision config."""
    config = base_model(model).config
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return (side, side)


def image_token_id(model: nn.Module) -> int:
    config = base_model(model).config
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    if token_id is None:
        raise ValueError("the student's config has no image_token_id; it is not a LLaVA-family model")
    return int(token_id)


# --------------------------------------------------------------------------- LoRA


def lora_target_names(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Fully qualified names of the LLM linear layers that get LoRA.

    Names are listed explicitly (rather than as suffixes) because the CLIP vision tower
    has its own ``q_proj``/``k_proj``/``v_proj`` that must stay untouched.
    """
    root = base_model(model)
    layers = language_model(root).layers
    depth = len(layers)
    chosen = range(depth) if settings.layers_to_transform is None else settings.layers_to_transform
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
        raise ValueError(f"lora.layers_to_transform has {bad}, outside 0..{depth - 1}")
    wanted = {id(layers[i]) for i in chosen}
    names = []
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in settings.target_modules:
            # Walk up to the decoder block that owns this linear layer.
            parent = name.split(".")
            for cut in range(len(parent) - 1, 0, -1):
                owner = root.get_submodule(".".join(parent[:cut]))
                if id(owner) in wanted:
                    names.append(name)
                    break
    if not names:
        raise ValueError(f"no linear layers named {settings.target_modules} found in the LLM")
    return names


def apply_lora(model: nn.Module, settings: LoraSettings):
    """Wraps ``model`` with peft LoRA on the LLM's linear layers; everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_names(model, settings),
        bias="none",
    )
    return get_peft_model(model, config)


# --------------------------------------------------------------------------- steer


class SteerAdapter(nn.Module):
    """``E_v + eps * E_v @ W^T`` on the visual span, with ``W`` zero at initialisation.

    Args:
        hidden_size: the LLM width ``D``.
        settings: mode (full / low_rank), rank and eps.
    """

    def __init__(self, hidden_size: int, settings: SteerSettings):
        super().__init__()
        if settings.mode == "off":
            raise ValueError("SteerAdapter built with mode=off; build none instead")
        self.mode = settings.mode
        self.eps = settings.eps
        if settings.mode == "full":
            self.weight = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        else:
            # LoRA-style: B = 0 makes W = B @ A zero, A random so gradients reach B at once.
            self.down = nn.Parameter(torch.empty(settings.rank, hidden_size))
            self.up = nn.Parameter(torch.zeros(hidden_size, settings.rank))
            nn.init.kaiming_uniform_(self.down, a=5**0.5)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """Returns the steer *update* ``eps * E_v @ W^T`` for ``visual`` ``[B, N, D]``."""
        if self.mode == "full":
            update = visual @ self.weight.to(visual.dtype).T
        else:
            update = (visual @ self.down.to(visual.dtype).T) @ self.up.to(visual.dtype).T
        return self.eps * update


def attach_steer(model: nn.Module, settings: SteerSettings) -> SteerAdapter | None:
    """Creates the steer adapter (or None for mode=off) as a trainable submodule of the model."""
    if settings.mode == "off":
        return None
    root = base_model(model)
    steer = SteerAdapter(root.config.text_config.hidden_size, settings)
    steer.to(next(root.parameters()).device)
    root.add_module("medalign_steer", steer)
    steer.requires_grad_(True)
    return steer


# --------------------------------------------------------------------------- token layout


def find_visual_positions(input_ids: torch.Tensor, image_token_id: int, num_visual_tokens: int) -> torch.Tensor:
    """Per-sample positions of the visual span, found from the image-token id.

    Works with left or right padding and mixed prompt lengths: nothing assumes an offset.

    Args:
        input_ids: ``[B, T]`` token ids.
        image_token_id: the id the processor expanded ``<image>`` into.
        num_visual_tokens: ``N = H*W``, the number of image tokens each sample must hold.

    Returns:
        ``[B, N]`` long tensor of positions, increasing along dim 1.

    Raises:
        ValueError: a sample holds a different number of image tokens, or a non-contiguous span.
    """
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    if not torch.all(counts == num_visual_tokens):
        bad = [(i, int(c)) for i, c in enumerate(counts.tolist()) if c != num_visual_tokens]
        raise ValueError(
            f"each sample needs exactly one image of {num_visual_tokens} image tokens (id {image_token_id}); "
            f"samples (index, count) {bad[:8]} differ. Use one image per sample and the student's own processor."
        )
    # Stable sort puts the image positions first, in order.
    positions = torch.argsort((~is_image).to(torch.int8), dim=1, stable=True)[:, :num_visual_tokens]
    if not torch.all(positions[:, -1] - positions[:, 0] == num_visual_tokens - 1):
        raise ValueError("image tokens are not contiguous in some sample; one <image> per sample is supported")
    return positions


def text_query_mask(
    visual_positions: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    seq_len: int,
) -> torch.Tensor:
    """Which tokens are the attention *queries*: the prompt text that follows the image.

    A query is a real (attended) token after the visual span and before the answer. The
    answer starts at the first position whose label is not ``-100``; without labels (at
    inference) the prompt runs to the end of the sequence.

    Returns:
        ``[B, T]`` bool mask.
    """
    batch = visual_positions.shape[0]
    index = torch.arange(seq_len, device=visual_positions.device).expand(batch, seq_len)
    mask = index > visual_positions[:, -1:]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    if labels is not None:
        has_answer = labels != IGNORE_INDEX
        first_answer = torch.where(has_answer.any(1), has_answer.int().argmax(1), torch.full_like(labels[:, 0], seq_len))
        mask = mask & (index < first_answer[:, None])
    return mask


def _gather_tokens(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``states[b, positions[b, n]]``: ``[B, T, D]`` x ``[B, N]`` -> ``[B, N, D]``."""
    return states.gather(1, positions[:, :, None].expand(-1, -1, states.shape[-1]))


# --------------------------------------------------------------------------- the tap


@dataclass
class TapOutputs:
    """What the tap captured during the last forward pass."""

    visual_states: torch.Tensor  # [B, N, D] input of block L on the visual span (after steer)
    attention: torch.Tensor | None  # [B, N] block L's text-to-image attention, head- and query-averaged
    query_counts: torch.Tensor | None  # [B] number of text query rows averaged per sample


@dataclass
class _Span:
    """Token layout of the current batch, located once at the model's entry."""

    positions: torch.Tensor  # [B, N] visual span
    attention_mask: torch.Tensor | None  # [B, T]
    query_positions: torch.Tensor | None = None  # [B, Q] text query rows, padded to the batch max
    query_valid: torch.Tensor | None = None  # [B, Q] which of those rows are real
    query_counts: torch.Tensor | None = None  # [B]


class DistillationTap:
    """Forward hooks that steer and capture the student at decoder layer ``L``.

    One pre-hook on the top-level model reads ``input_ids`` / ``attention_mask`` /
    ``labels`` and locates each sample's visual span and text queries; one pre-hook on
    block ``L`` applies the steer adapter to the visual span and records the visual states
    and (when ``capture_attention``) the recomputed text-to-image attention. A forward
    pass without image tokens (e.g. a cached decoding step) passes through untouched.

    Args:
        model: the (optionally peft-wrapped) LLaVA-family student.
        layer: distillation layer ``L`` in ``1 .. depth-1``.
        steer: optional steer adapter applied at the same point.
        capture_attention: recompute block ``L``'s attention (skip it when lambda_attn=0).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: int,
        steer: SteerAdapter | None = None,
        capture_attention: bool = True,
    ):
        self.layer = validate_layer(model, layer)
        self.block = decoder_layers(model)[layer]
        self.steer = steer
        self.capture_attention = capture_attention
        self.grid = visual_grid(model)
        self.num_visual_tokens = self.grid[0] * self.grid[1]
        self.image_token_id = image_token_id(model)
        attention = self.block.self_attn
        # The layer's own rotary helper keeps architecture-specific conventions (Llama,
        # Mistral, Qwen2, partial rotary...) in one place: the model's module.
        self._apply_rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        # Mistral slides every layer; models with per-layer types (Qwen2, Gemma) only some.
        config = attention.config
        self._sliding_window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None and layer_types[layer] != "sliding_attention":
            self._sliding_window = None
        self._span: _Span | None = None
        self.outputs: TapOutputs | None = None
        self._handles = [
            base_model(model).register_forward_pre_hook(self._locate_span, with_kwargs=True),
            self.block.register_forward_pre_hook(self._at_layer, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def pop(self) -> TapOutputs:
        """Returns and clears the last capture (raises if the last forward had no image)."""
        if self.outputs is None:
            raise RuntimeError("the distillation tap captured nothing: the last forward pass had no image tokens")
        outputs, self.outputs = self.outputs, None
        return outputs

    # The hooks ----------------------------------------------------------------------

    def _locate_span(self, module, args, kwargs):
        # Everything data-dependent (span search, checks, the query count) happens here, at
        # the model's entry, so the decoder loop holds no graph break under torch.compile.
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._span = None
        if input_ids is None or not bool((input_ids == self.image_token_id).any()):
            # Keep the last capture: during generate() it is the prefill's, taken on the prompt.
            return None
        self.outputs = None
        positions = find_visual_positions(input_ids, self.image_token_id, self.num_visual_tokens)
        attention_mask = kwargs.get("attention_mask")
        span = _Span(positions=positions, attention_mask=attention_mask)
        if self.capture_attention:
            queries = text_query_mask(positions, attention_mask, kwargs.get("labels"), input_ids.shape[1])
            counts = queries.sum(1)
            if bool((counts == 0).any()):
                empty = torch.nonzero(counts == 0).flatten().tolist()
                raise ValueError(
                    f"samples {empty[:8]} have no prompt text after the image, so block {self.layer}'s "
                    "text-to-image attention is undefined; put the question after <image> or set "
                    "distill.lambda_attn=0."
                )
            num_queries = int(counts.max())
            span.query_positions = torch.argsort((~queries).to(torch.int8), dim=1, stable=True)[:, :num_queries]
            span.query_valid = torch.arange(num_queries, device=counts.device)[None, :] < counts[:, None]
            span.query_counts = counts
        self._span = span
        return None

    def _at_layer(self, module, args, kwargs):
        if self._span is None:
            return None
        span = self._span
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.steer is not None:
            index = span.positions[:, :, None].expand(-1, -1, hidden.shape[-1])
            hidden = hidden.scatter_add(1, index, self.steer(hidden.gather(1, index)))
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
        visual = _gather_tokens(hidden, span.positions)
        attention = None
        if self.capture_attention:
            attention = self._text_to_image_attention(hidden, span, kwargs["position_embeddings"])
        self.outputs = TapOutputs(visual_states=visual, attention=attention, query_counts=span.query_counts)
        return args, kwargs

    def _text_to_image_attention(self, hidden, span: "_Span", position_embeddings) -> torch.Tensor:
        """Block L's attention probabilities, text queries to visual keys.

        Recomputes ``softmax(q k^T * scale)`` exactly as eager attention does, but only for
        the query rows that are needed: ``[B, heads, Q, T]`` with ``Q`` the prompt text.

        Returns:
            ``[B, N]`` attention averaged over heads and query rows.
        """
        block = self.block
        attn = block.self_attn
        batch, seq_len, _ = hidden.shape
        query_positions, query_valid = span.query_positions, span.query_valid  # [B, Q]
        num_queries = query_positions.shape[1]

        normed = block.input_layernorm(hidden)
        head_dim = attn.head_dim
        q = attn.q_proj(_gather_tokens(normed, query_positions)).view(batch, num_queries, -1, head_dim)
        k = attn.k_proj(normed).view(batch, seq_len, -1, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms come before the rotary embedding
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, Q, hd], [B, kv_heads, T, hd]
        cos, sin = position_embeddings
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        q = self._apply_rotary(q, q, _gather_tokens(cos, query_positions), _gather_tokens(sin, query_positions))[0]
        k = self._apply_rotary(k, k, cos, sin)[0]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention

        scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # [B, heads, Q, T]
        keys = torch.arange(seq_len, device=hidden.device)
        allowed = keys[None, None, :] <= query_positions[:, :, None]  # causal, [B, Q, T]
        if self._sliding_window:
            allowed = allowed & (keys[None, None, :] > query_positions[:, :, None] - self._sliding_window)
        if span.attention_mask is not None:
            allowed = allowed & span.attention_mask.bool()[:, None, :]
        # Padding rows (Q is the batch maximum) must not be all -inf, or softmax gives NaN.
        allowed = allowed | ~query_valid[:, :, None]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        probs = F.softmax(scores, dim=-1)
        visual = probs.gather(-1, span.positions[:, None, None, :].expand(-1, probs.shape[1], num_queries, -1))
        per_query = visual.mean(dim=1)  # [B, Q, N], averaged over heads
        per_query = per_query.masked_fill(~query_valid[:, :, None], 0.0)
        return per_query.sum(dim=1) / span.query_counts[:, None]
