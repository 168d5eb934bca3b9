"""The layer-L distillation tap: locate the visual span and text queries, steer, capture.

MedAlign needs two quantities at one decoder layer ``L`` (0-based HF index):

* the visual-span hidden states at the *input* of block ``L`` (HF ``hidden_states[L]``),
* block ``L``'s attention probabilities from the prompt's text tokens to the visual span.

Both are captured by one forward pre-hook on block ``L`` (:class:`DistillationTap`). The
attention probabilities are recomputed for that one layer from its own q/k projections and
rotary embeddings, so the model keeps SDPA (or flash) attention everywhere and never
materialises ``[B, heads, T, T]`` for all layers the way ``output_attentions=True`` does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .student import IGNORE_INDEX, SteerAdapter, base_model, check_layer, decoder_layers, image_token_id, visual_grid


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
        self.layer = check_layer(layer, len(decoder_layers(model)), type(base_model(model)).__name__)
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
        if (input_ids is None or input_ids.shape[-1] < self.num_visual_tokens
                or not bool((input_ids == self.image_token_id).any())):
            # Keep the last capture: during generate() it is the prefill's, taken on the prompt.
            # A decode step holds too few tokens for an image (an untrained student may still
            # emit the image token id as an answer token), so it never replaces the capture.
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
