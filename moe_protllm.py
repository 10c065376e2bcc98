"""Mixture-of-experts feed-forward blocks upcycled from a dense LLM (SEPIT stage 2).

Every decoder feed-forward block becomes `num_experts` copies of itself behind a router, with top-k
routing and an expert capacity. The active parameters per token stay those of the dense block
(top-1), which is SEPIT's "same activated parameters" claim.
"""

import copy
import math

import torch
from torch import nn


class ProtLLMSparseMoeBlock(nn.Module):
    """Top-k routed mixture of feed-forward experts.

    Gate values are the router's top-k probabilities divided by their own (detached) sum: they sum to 1
    in value, so copies of one dense block reproduce that block exactly at the start of upcycling, while
    the router still receives the language-model gradient (d log p), not only the balancing loss.

    Tokens beyond an expert's capacity (`ceil(capacity_factor * tokens * top_k / num_experts)`, in token
    order) skip the block: their output is zero and only the decoder's residual path carries them, as in
    Switch Transformers. A capacity factor of `None` routes every token (no dropping).

    The router logits of the last call are kept in `last_router_logits` (shape `(tokens, num_experts)`)
    for the load-balancing loss; `ProtLLMModel` collects them after the LLM forward.
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
        self.last_router_logits: torch.Tensor | None = None

    def expert_capacity(self, num_tokens: int) -> int | None:
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        return max(1, math.ceil(factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`hidden_states`: `(batch, seq_len, hidden)` -> same shape."""
        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, self.hidden_size)
        router_logits = self.router(tokens)  # (tokens, experts)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)  # (tokens, k)
        gates = (top_probs / top_probs.sum(dim=-1, keepdim=True).detach()).to(tokens.dtype)

        capacity = self.expert_capacity(tokens.shape[0])
        output = torch.zeros_like(tokens)
        for expert_index, expert in enumerate(self.experts):
            token_index, slot = torch.where(top_experts == expert_index)
            if capacity is not None:
                token_index, slot = token_index[:capacity], slot[:capacity]
            if token_index.numel() == 0:
                continue
            expert_out = expert(tokens[token_index].unsqueeze(0)).squeeze(0)
            output.index_add_(0, token_index, expert_out * gates[token_index, slot, None])
        self.last_router_logits = router_logits
        return output.reshape(shape)


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


def active_parameter_count(language_model: nn.Module) -> int:
    """Parameters one token passes through: routers + top_k experts per MoE block + everything else."""
    total = 0
    for name, param in language_model.named_parameters():
        if ".experts." in name:
            continue
        total += param.numel()
    for block in moe_blocks(language_model):
        expert_params = sum(p.numel() for p in block.experts[0].parameters())
        total += block.top_k * expert_params
    return total
