"""Mixture-of-experts feed-forward blocks upcycled from a dense LLM (SEPIT stage 2).

Every decoder feed-forward block becomes `num_experts` copies of itself behind a router, with top-k
routing and an expert capacity. The active parameters per token stay those of the dense block
(top-1), which is SEPIT's "same activated parameters" claim.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


class ProtLLMMoeRouting:
    """Per-forward routing state shared by the MoE blocks of one LLM forward.

    `token_mask` `(B, S)` bool marks the real (non-padding) tokens: padding takes no expert capacity and skips
    the experts. Each block appends its router logits `(B * S, num_experts)` to `router_logits`, in layer order.
    `ProtLLMSepitModel` creates one per forward; under gradient checkpointing the logits leave each recomputed layer as
    an output of the checkpointed function (see `checkpoint_returning_router_logits`), so they keep their gradient
    even with re-entrant checkpointing.
    """

    def __init__(self, token_mask: torch.Tensor | None = None):
        self.token_mask = token_mask
        self.router_logits: list[torch.Tensor] = []


class ProtLLMSparseMoeBlock(nn.Module):
    """Top-k routed mixture of feed-forward experts.

    Gate values are the router's top-k probabilities divided by their own (detached) sum: they sum to 1
    in value, so copies of one dense block reproduce that block exactly at the start of upcycling, while
    the router still receives the language-model gradient (d log p), not only the balancing loss.

    Tokens beyond an expert's capacity (`ceil(capacity_factor * real_tokens * top_k / num_experts)`, in token
    order) skip the block: their output is zero and only the decoder's residual path carries them, as in
    Switch Transformers. Padding tokens never take capacity (and skip the experts). In training the capacity is
    shared by the whole batch (SEPIT / Switch); in evaluation it is per sequence, so batched generation equals
    one-at-a-time generation. A capacity factor of `None` routes every real token.

    The routing state of the current forward (token mask, router-logit list) is `self.routing`, installed by
    `ProtLLMSepitModel` for the duration of the LLM forward (and by the checkpoint wrapper during recomputation).
    """

    def __init__(self, dense_mlp: nn.Module, hidden_size: int, num_experts: int, top_k: int = 1,
                 capacity_factor: float | None = 1.25, eval_capacity_factor: float | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(copy.deepcopy(dense_mlp) for _ in range(num_experts))
        self.routing: ProtLLMMoeRouting | None = None

    def _kept_assignments(self, top_experts: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor | None:
        """`top_experts` `(B, S, k)` -> `(B * S, k)` bool: the assignments inside capacity, from real tokens only
        (None: keep all). Ranks count in token order (then slot), within the batch (training) or the row (eval)."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None and token_mask is None:
            return None
        batch, seq_len, top_k = top_experts.shape
        real = torch.ones(batch, seq_len, dtype=torch.bool, device=top_experts.device) if token_mask is None else token_mask.bool()
        keep = real.unsqueeze(-1).expand(batch, seq_len, top_k)
        if factor is not None:
            groups = 1 if self.training else batch
            assignments = F.one_hot(top_experts, self.num_experts) * keep.unsqueeze(-1)  # (B, S, k, E)
            assignments = assignments.reshape(groups, -1, self.num_experts)
            # 0-based position of each assignment in its expert's queue within the group.
            position = ((assignments.cumsum(dim=1) - 1) * assignments).sum(-1)  # (G, B * S * k / G)
            real_tokens = real.reshape(groups, -1).sum(dim=1, keepdim=True)  # (G, 1)
            capacity = torch.ceil(factor * real_tokens * self.top_k / self.num_experts).clamp(min=1)
            keep = keep & (position < capacity).reshape(batch, seq_len, top_k)
        return keep.reshape(batch * seq_len, top_k)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states`: `(batch, seq_len, hidden)` -> same shape."""
        shape = hidden_states.shape
        routing = self.routing
        token_mask = routing.token_mask if routing is not None else None
        if token_mask is not None and token_mask.shape != shape[:2]:
            raise ValueError(f"MoE token mask of shape {tuple(token_mask.shape)} does not match the hidden states {tuple(shape[:2])}")
        tokens = hidden_states.reshape(-1, self.hidden_size)
        router_logits = self.router(tokens)  # (tokens, experts)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)  # (tokens, k)
        gates = (top_probs / top_probs.sum(dim=-1, keepdim=True).detach()).to(tokens.dtype)
        kept = self._kept_assignments(top_experts.reshape(*shape[:2], self.top_k), token_mask)

        output = torch.zeros_like(tokens)
        for expert_index, expert in enumerate(self.experts):
            selected = top_experts == expert_index
            if kept is not None:
                selected = selected & kept
            token_index, slot = torch.where(selected)
            if token_index.numel() == 0:
                continue
            expert_out = expert(tokens[token_index].unsqueeze(0)).squeeze(0)
            output.index_add_(0, token_index, expert_out * gates[token_index, slot, None])
        if routing is not None:
            routing.router_logits.append(router_logits)
        return output.reshape(shape)


def checkpoint_returning_router_logits(checkpoint_function, block: ProtLLMSparseMoeBlock):
    """Wrap a decoder layer's `_gradient_checkpointing_func` so that the router logits of its MoE `block` are an
    output of the checkpointed function. Re-entrant checkpointing runs the forward without autograd and only the
    function's outputs get a gradient path: logits recorded on the side would have none."""

    def checkpointed(function, *args):
        outer = block.routing
        if outer is None:
            return checkpoint_function(function, *args)

        def layer_and_router_logits(*inputs):
            # Runs in the forward and again in the backward recomputation: install this call's routing both times.
            inner = ProtLLMMoeRouting(outer.token_mask)
            block.routing = inner
            try:
                hidden = function(*inputs)
            finally:
                block.routing = outer
            return hidden, inner.router_logits[-1]

        hidden, router_logits = checkpoint_function(layer_and_router_logits, *args)
        outer.router_logits.append(router_logits)
        return hidden

    checkpointed.protllm_moe_wrapped = True
    return checkpointed


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers base LM (`layers` for Llama/Qwen2/Mistral/Phi-3, `h` for GPT-2)."""
    for name in ("layers", "h", "blocks"):
        layers = getattr(language_model, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"cannot find the decoder layers of {type(language_model).__name__} (looked for .layers, .h, .blocks)")


def upcycle_feed_forward_blocks(language_model: nn.Module, hidden_size: int, num_experts: int, top_k: int,
                                capacity_factor: float | None, eval_capacity_factor: float | None) -> int:
    """Replace every decoder layer's `.mlp` by a `ProtLLMSparseMoeBlock` of copies of it. Returns the layer count."""
    layers = decoder_layers(language_model)
    for index, layer in enumerate(layers):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            raise ValueError(f"decoder layer {index} of {type(language_model).__name__} has no .mlp feed-forward block")
        if isinstance(mlp, ProtLLMSparseMoeBlock):
            raise ValueError("the language model is already a mixture of experts")
        layer.mlp = ProtLLMSparseMoeBlock(mlp, hidden_size, num_experts, top_k, capacity_factor, eval_capacity_factor)
    return len(layers)


def moe_blocks(module: nn.Module) -> list[ProtLLMSparseMoeBlock]:
    return [m for m in module.modules() if isinstance(m, ProtLLMSparseMoeBlock)]
