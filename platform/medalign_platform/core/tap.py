"""The layer-L distillation tap: locate the visual span and text queries, steer, capture.

MedAlign needs two quantities at one decoder layer ``L`` (0-based HF index):

* the visual-span hidden states at the *input* of block ``L`` (HF ``hidden_states[L]``),
* block ``L``'s attention probabilities from the prompt's text tokens to the visual span.

Both are captured by forward hooks at block ``L`` (:class:`DistillationTap`). The attention
probabilities are formed for that one layer, and only for the text query rows, from the
q/k projection outputs *of the forward itself* (forward hooks on ``q_proj``/``k_proj``), so
they are exactly the attention the block ran -- the same LoRA-dropout mask in train mode --
while the model keeps SDPA (or flash) attention everywhere and never materialises
``[B, heads, T, T]`` for all layers the way ``output_attentions=True`` does.

The span layout (visual positions, text query rows) can be located on the CPU before the
batch reaches the device (:class:`SpanLocator`, run in the data-loader workers, then handed
over with :meth:`DistillationTap.expect`), so a training forward holds no host sync.
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


# --------------------------------------------------------------------------- span layout


@dataclass
class SpanLayout:
    """Token layout of one batch: where the visual span and the text queries are.

    Attributes:
        positions: ``[B, N]`` visual span.
        attention_mask: ``[B, T]`` or None.
        query_positions: ``[B, Q]`` text query rows, padded to the batch maximum (None when
            the attention is not captured).
        query_valid: ``[B, Q]`` which of those rows are real.
        query_counts: ``[B]`` number of real query rows per sample.
    """

    positions: torch.Tensor
    attention_mask: torch.Tensor | None
    query_positions: torch.Tensor | None = None
    query_valid: torch.Tensor | None = None
    query_counts: torch.Tensor | None = None

    def _map(self, fn) -> "SpanLayout":
        return SpanLayout(*(None if value is None else fn(value) for value in
                            (self.positions, self.attention_mask, self.query_positions, self.query_valid,
                             self.query_counts)))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SpanLayout":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "SpanLayout":
        """Pinned copy (``DataLoader(pin_memory=True)`` calls this on the objects it yields)."""
        return self._map(lambda t: t.pin_memory())

    @property
    def has_queries(self) -> bool:
        return self.query_positions is not None


@dataclass(frozen=True)
class SpanLocator:
    """Locates a batch's :class:`SpanLayout` from its ids, on whatever device they are.

    Plain numbers only, so data-loader worker processes can run it on the CPU batch; the
    checks (one image of ``N`` tokens per sample, prompt text after the image) fail there
    with the same messages as in the tap.
    """

    image_token_id: int
    num_visual_tokens: int
    with_queries: bool
    layer: int

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> SpanLayout:
        positions = find_visual_positions(input_ids, self.image_token_id, self.num_visual_tokens)
        span = SpanLayout(positions=positions, attention_mask=attention_mask)
        if not self.with_queries:
            return span
        queries = text_query_mask(positions, attention_mask, labels, input_ids.shape[1])
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
        return span


# --------------------------------------------------------------------------- the tap


@dataclass
class TapOutputs:
    """What the tap captured during the last forward pass."""

    visual_states: torch.Tensor  # [B, N, D] input of block L on the visual span (after steer)
    attention: torch.Tensor | None  # [B, N] block L's text-to-image attention, head- and query-averaged
    query_counts: torch.Tensor | None  # [B] number of text query rows averaged per sample


class DistillationTap:
    """Forward hooks that steer and capture the student at decoder layer ``L``.

    * a pre-hook on the top-level model reads ``input_ids`` / ``attention_mask`` /
      ``labels`` and locates each sample's visual span and text queries (or takes the
      layout handed over with :meth:`expect`);
    * a pre-hook on block ``L`` applies the steer adapter to the visual span and records
      the visual states (HF ``hidden_states[L]`` on the span, after the steer);
    * when ``capture_attention``: forward hooks on block ``L``'s ``q_proj`` and ``k_proj``
      keep the projections the block computed (the query rows only, for q), and a forward
      hook on its ``self_attn`` turns them into the text-to-image attention probabilities.

    A forward pass without image tokens (e.g. a cached decoding step) passes through
    untouched. Attach the tap after LoRA is applied: the projection hooks sit on the
    modules that are ``q_proj``/``k_proj`` at that time (peft's LoRA layers, so the LoRA
    update and its dropout are part of what they see).

    Args:
        model: the (optionally peft-wrapped) LLaVA-family student.
        layer: distillation layer ``L`` in ``1 .. depth-1``.
        steer: optional steer adapter applied at the same point.
        capture_attention: capture block ``L``'s attention (skip it when lambda_attn=0).
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
        self._span: SpanLayout | None = None
        self._expected: SpanLayout | None = None
        self._position_embeddings = None
        self._query_rows: torch.Tensor | None = None  # q_proj output on the query rows, [B, Q, heads*hd]
        self._keys: torch.Tensor | None = None  # k_proj output, [B, T, kv_heads*hd]
        self.outputs: TapOutputs | None = None
        self._handles = [
            base_model(model).register_forward_pre_hook(self._locate_span, with_kwargs=True),
            self.block.register_forward_pre_hook(self._at_layer, with_kwargs=True),
            attention.q_proj.register_forward_hook(self._on_query),
            attention.k_proj.register_forward_hook(self._on_key),
            attention.register_forward_hook(self._on_attention),
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

    def locator(self) -> SpanLocator:
        """What locates this tap's span layout outside the model (e.g. in data-loader workers)."""
        return SpanLocator(self.image_token_id, self.num_visual_tokens, self.capture_attention, self.layer)

    def expect(self, layout: SpanLayout | None) -> None:
        """Hands over the next forward's span layout, already located (and on the model's device).

        The model-entry hook then skips its own search, which reads tensors on the host: on a
        GPU those reads would make the CPU wait for the previous step before launching the next.
        """
        self._expected = layout

    # The hooks ----------------------------------------------------------------------

    def _locate_span(self, module, args, kwargs):
        # Everything data-dependent (span search, checks, the query count) happens here, at
        # the model's entry, so the decoder loop holds no graph break under torch.compile.
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        expected, self._expected = self._expected, None
        self._span = None
        self._query_rows = self._keys = None
        if input_ids is None:
            return None
        if (expected is not None and tuple(expected.positions.shape) == (input_ids.shape[0], self.num_visual_tokens)
                and (expected.has_queries or not self.capture_attention)
                and (expected.attention_mask is None or expected.attention_mask.shape == input_ids.shape)):
            self.outputs = None
            self._span = expected
            return None
        if input_ids.shape[-1] < self.num_visual_tokens or not bool((input_ids == self.image_token_id).any()):
            # Keep the last capture: during generate() it is the prefill's, taken on the prompt.
            # A decode step holds too few tokens for an image (an untrained student may still
            # emit the image token id as an answer token), so it never replaces the capture.
            return None
        self.outputs = None
        locate = SpanLocator(self.image_token_id, self.num_visual_tokens, self.capture_attention, self.layer)
        self._span = locate(input_ids, kwargs.get("attention_mask"), kwargs.get("labels"))
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
        self._position_embeddings = kwargs["position_embeddings"]
        self.outputs = TapOutputs(visual_states=visual, attention=None, query_counts=span.query_counts)
        return args, kwargs

    def _wants_projections(self) -> bool:
        return self._span is not None and self.capture_attention

    def _on_query(self, module, args, output):
        if self._wants_projections():
            self._query_rows = _gather_tokens(output, self._span.query_positions)
        return None

    def _on_key(self, module, args, output):
        if self._wants_projections():
            self._keys = output
        return None

    def _on_attention(self, module, args, output):
        if self._wants_projections() and self._query_rows is not None and self._keys is not None:
            # Non-reentrant gradient checkpointing replays the block in backward and needs the
            # same tensor work as the forward, so the replay computes the attention too; it is
            # kept only when the current capture has none yet (the replay's is discarded).
            attention = self._text_to_image_attention(self._query_rows, self._keys, self._span)
            if self.outputs is not None and self.outputs.attention is None:
                self.outputs.attention = attention
        self._query_rows = self._keys = None
        return None

    def _text_to_image_attention(self, query_rows, keys, span: SpanLayout) -> torch.Tensor:
        """Block L's attention probabilities, text queries to visual keys.

        ``softmax(q k^T * scale)`` exactly as eager attention forms it, from the projections
        the forward computed, but only for the query rows that are needed: ``[B, heads, Q, T]``
        with ``Q`` the prompt text.

        Args:
            query_rows: ``q_proj`` output on the query rows, ``[B, Q, heads * hd]``.
            keys: ``k_proj`` output, ``[B, T, kv_heads * hd]``.

        Returns:
            ``[B, N]`` attention averaged over heads and query rows.
        """
        attn = self.block.self_attn
        batch, seq_len, _ = keys.shape
        query_positions, query_valid = span.query_positions, span.query_valid  # [B, Q]
        num_queries = query_positions.shape[1]
        head_dim = attn.head_dim
        q = query_rows.view(batch, num_queries, -1, head_dim)
        k = keys.view(batch, seq_len, -1, head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms come before the rotary embedding
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, Q, hd], [B, kv_heads, T, hd]
        cos, sin = self._position_embeddings
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        q = self._apply_rotary(q, q, _gather_tokens(cos, query_positions), _gather_tokens(sin, query_positions))[0]
        k = self._apply_rotary(k, k, cos, sin)[0]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # grouped-query attention

        scores = (q @ k.transpose(-1, -2)).float() * attn.scaling  # [B, heads, Q, T]
        keys_index = torch.arange(seq_len, device=keys.device)
        allowed = keys_index[None, None, :] <= query_positions[:, :, None]  # causal, [B, Q, T]
        if self._sliding_window:
            allowed = allowed & (keys_index[None, None, :] > query_positions[:, :, None] - self._sliding_window)
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
