"""Grounding read where the answer is formed: the answer position's attention, every layer and head.

The run's first grounding score, ``grounding_layer``
(:func:`medalign_platform.data.metrics.grounding_score` of the distillation tap's capture),
averages block ``L``'s attention over all heads and all prompt tokens: the very quantity
the attention loss trains, so a run that lowers that loss raises it whether or not the
answers change. The answer is formed elsewhere: the first answer token is predicted from
the hidden state of the *last prompt token*, which gathers what it needs from the image
through its own attention rows at every layer. :class:`AnswerAttentionTap` records those
rows during ``generate()``'s prefill, per layer and head, and :func:`answer_grounding`
scores them against each item's mask (the region its question is about):

* ``grounding_answer``: attention mass on the region / the region's area fraction (1.0 is
  chance), of the answer position's attention averaged over layers and heads;
* ``pointing_answer``: pointing game, share of items whose most attended visual token
  (same average) lies on the region;
* ``grounding_answer_l{l}``: the mass ratio of layer ``l`` (heads averaged), and with
  ``detail=True`` ``grounding_answer_l{l}h{h}`` per head.

Attention probabilities are recomputed from each block's own q/k projections and rotary
embeddings for the one query row needed (as ``core.student.DistillationTap`` does for its
layer), so the model keeps SDPA attention.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..core.student import base_model, decoder_layers, image_token_id, visual_grid
from ..core.tap import find_visual_positions
from ..data.metrics import grounding_score, mean_grounding_score, pointing_hit

__all__ = ["AnswerAttentionTap", "answer_grounding"]


class AnswerAttentionTap:
    """Forward hooks recording every layer's attention from the answer position to the image.

    The answer position of a prompt is its last attended token (generation pads on the
    left, so with padding it is the last column; any padding side works). Forward passes
    without image tokens (cached decoding steps) pass through untouched, so after
    ``generate()`` the capture is the prefill's.

    Args:
        model: the (optionally peft-wrapped) LLaVA-family student.

    Example:
        >>> tap = AnswerAttentionTap(model)
        >>> answers = generate_answers(model, processor, items, on_batch=lambda *_: rows.append(tap.pop()))
        >>> tap.remove()
    """

    def __init__(self, model: nn.Module):
        self.blocks = list(decoder_layers(model))
        self.grid = visual_grid(model)
        self.num_visual_tokens = self.grid[0] * self.grid[1]
        self.image_token_id = image_token_id(model)
        attention = self.blocks[0].self_attn
        self._apply_rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self._span: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._rows: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._handles = [base_model(model).register_forward_pre_hook(self._locate, with_kwargs=True)]
        for index, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._hook(index), with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def pop(self) -> torch.Tensor:
        """``[B, layers, heads, N]`` float32 CPU attention of the last captured prompt batch."""
        if any(row is None for row in self._rows):
            raise RuntimeError("the answer-attention tap captured nothing: the last forward pass had no image tokens")
        rows = torch.stack(self._rows, dim=1)
        self._rows = [None] * len(self.blocks)
        return rows

    def _locate(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._span = None
        if (input_ids is None or input_ids.shape[-1] < self.num_visual_tokens
                or not bool((input_ids == self.image_token_id).any())):
            # A decode step holds too few tokens for an image (an untrained student may still
            # emit the image token id as an answer token): keep the prefill's capture.
            return None
        positions = find_visual_positions(input_ids, self.image_token_id, self.num_visual_tokens)
        mask = kwargs.get("attention_mask")
        seq_len = input_ids.shape[1]
        if mask is None:
            last = torch.full((input_ids.shape[0],), seq_len - 1, device=input_ids.device)
        else:
            index = torch.arange(seq_len, device=input_ids.device).expand_as(mask)
            last = torch.where(mask.bool(), index, torch.zeros_like(index)).amax(dim=1)
        self._span = (positions, last, mask)
        return None

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            if self._span is not None:
                hidden = args[0] if args else kwargs["hidden_states"]
                with torch.no_grad():
                    self._rows[index] = self._answer_row(module, hidden, kwargs["position_embeddings"]).cpu()
            return None

        return hook

    def _answer_row(self, block, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        """``[B, heads, N]``: softmax(q_last k^T * scale) of ``block`` on the visual span."""
        positions, last, mask = self._span
        attn = block.self_attn
        batch, seq_len, _ = hidden.shape
        normed = block.input_layernorm(hidden)
        query_states = normed.gather(1, last[:, None, None].expand(-1, 1, normed.shape[-1]))  # [B, 1, D]
        head_dim = attn.head_dim
        # .forward, not a call: the distillation tap hooks these modules' calls (core/tap.py),
        # and this side computation must not be taken for the block's own projections.
        q = attn.q_proj.forward(query_states).view(batch, 1, -1, head_dim)
        k = attn.k_proj.forward(normed).view(batch, seq_len, -1, head_dim)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
        pick = last[:, None, None].expand(-1, 1, cos.shape[-1])
        q = self._apply_rotary(q, q, cos.gather(1, pick), sin.gather(1, pick))[0]
        k = self._apply_rotary(k, k, cos, sin)[0]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)).float().squeeze(2) * attn.scaling  # [B, heads, T]
        keys = torch.arange(seq_len, device=hidden.device)
        allowed = keys[None, :] <= last[:, None]
        if mask is not None:
            allowed = allowed & mask.bool()
        probs = F.softmax(scores.masked_fill(~allowed[:, None, :], float("-inf")), dim=-1)
        return probs.gather(-1, positions[:, None, :].expand(-1, probs.shape[1], -1))


def answer_grounding(attention: torch.Tensor, masks: list, grid: tuple[int, int], *, detail: bool = False
                     ) -> dict[str, float]:
    """Scores the answer position's attention against the items' masks.

    Args:
        attention: ``[n, layers, heads, N]`` (:meth:`AnswerAttentionTap.pop`, concatenated).
        masks: ``n`` masks (``[H, W]`` arrays or None); items without a mask, or with an
            empty one, are skipped.
        grid: the visual grid.
        detail: add the per-head ``grounding_answer_l{l}h{h}``.

    Returns:
        ``grounding_answer``, ``pointing_answer``, ``grounding_answer_l{l}`` (see the module
        docstring); empty when no item has a non-empty mask.
    """
    keep = [i for i, mask in enumerate(masks) if mask is not None and bool(torch.as_tensor(mask).any())]
    if not keep:
        return {}
    rows = attention[keep].float()  # [m, layers, heads, N]
    mask = torch.stack([torch.as_tensor(masks[i]) for i in keep])
    pooled = rows.mean(dim=(1, 2))
    out = {"grounding_answer": mean_grounding_score(grounding_score(pooled, mask, grid)),
           "pointing_answer": mean_grounding_score(pointing_hit(pooled, mask, grid))}
    for layer in range(rows.shape[1]):
        out[f"grounding_answer_l{layer}"] = mean_grounding_score(grounding_score(rows[:, layer].mean(1), mask, grid))
        if detail:
            for head in range(rows.shape[2]):
                out[f"grounding_answer_l{layer}h{head}"] = mean_grounding_score(
                    grounding_score(rows[:, layer, head], mask, grid))
    return out
