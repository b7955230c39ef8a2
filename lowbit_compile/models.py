"""Small reference models for examples and tests (random weights, no downloads).

`TinyLlama` follows the Llama architecture: RMSNorm, rotary position embeddings, grouped-query
attention through `F.scaled_dot_product_attention`, a SwiGLU MLP, and an lm_head (optionally tied
to the token embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    max_positions: int = 2048
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


def rotary_tables(
    config: LlamaConfig, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / config.rope_theta ** (
        torch.arange(0, config.head_dim, 2, device=positions.device, dtype=torch.float32) / config.head_dim
    )
    angles = positions.float()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(batch, length, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin)
        return x + self.mlp(self.post_attn_norm(x))


def _build_decoder(model: nn.Module, config: LlamaConfig, layer_type: type[nn.Module]) -> None:
    """Give `model` the Llama trunk: embedding, `num_layers` layers, final norm and lm_head (tied to the
    embedding when the config says so)."""
    model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    model.layers = nn.ModuleList(layer_type(config) for _ in range(config.num_layers))
    model.norm = RMSNorm(config.hidden_size)
    model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


class TinyLlama(nn.Module):
    """tokens (B, L) int64 -> logits (B, L, vocab)."""

    def __init__(self, config: LlamaConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or LlamaConfig()
        _build_decoder(self, config, DecoderLayer)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        cos, sin = rotary_tables(self.config, positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


class CachedAttention(Attention):
    """Grouped-query attention over a static KV cache held as two buffers (batch, kv_heads, max_len,
    head_dim), written in place with `index_copy_` at the given positions; the cache is read as it is
    (no repeated K/V). `mask` comes from `StaticCacheLlama.forward`, shaped for this call's length.

    A decode step (one query position) runs SDPA with `enable_gqa` and an additive mask: about 6x
    faster at batch 1 on an H100 (9 against 54 us over 2112 cached positions) than folding the query
    heads into the query length, which gives cuDNN's 64-row query tile 4 rows and the GPU 8 programs
    (RESULTS.md, fourteenth session). A prompt (several positions) folds the query heads that share a
    KV head into the query length, with a boolean mask over (group * length) rows."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)  # the same projections as Attention
        self.register_buffer("k_cache", torch.zeros(0), persistent=False)
        self.register_buffer("v_cache", torch.zeros(0), persistent=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        c = self.config
        group = c.num_heads // c.num_kv_heads
        q = self.q_proj(x).view(batch, length, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # The whole buffer, never a slice of it: Inductor writes an index_copy_ into a full input
        # buffer in place, but copies a sliced one whole on every call.
        self.k_cache.index_copy_(2, positions, k)
        self.v_cache.index_copy_(2, positions, v)
        if length == 1:  # decode: (B, H, 1, D) against (B, KV, max_len, D), additive (1, max_len) mask
            out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask, enable_gqa=True)
            return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        # Query head h reads KV head h // group: (B, H, L, D) -> (B, KV, group * L, D).
        q = q.reshape(batch, c.num_kv_heads, group * length, c.head_dim)
        out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        out = out.view(batch, c.num_heads, length, c.head_dim).transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(out)


class CachedDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size)
        self.attn = CachedAttention(config)
        self.post_attn_norm = RMSNorm(config.hidden_size)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, positions, mask)
        return x + self.mlp(self.post_attn_norm(x))


class StaticCacheLlama(nn.Module):
    """`TinyLlama` for generation with a static KV cache, as served with CUDA graphs.

    tokens (B, L) int64 and positions (L,) int64 (where the tokens go in the cache, the same for every
    row) -> logits of the last position (B, 1, vocab). Positions are a tensor, so every decode step
    reuses one compiled graph. Each layer's K/V cache is a pair of module buffers of shape
    (batch, kv_heads, max_len, head_dim), allocated by `allocate_cache` (on the weights' device and
    dtype) and updated in place with `index_copy_`; a position attends to every cached position up to
    its own. Build with `device="meta"` and call `init_weights` after `to_empty` for large configs.
    """

    def __init__(self, config: LlamaConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or LlamaConfig()
        _build_decoder(self, config, CachedDecoderLayer)
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def allocate_cache(self, batch: int, max_len: int) -> None:
        """(Re)allocate every layer's K/V cache, zeroed, for `batch` rows and `max_len` positions."""
        c, weight = self.config, self.lm_head.weight
        for layer in self.layers:
            for name in ("k_cache", "v_cache"):
                setattr(layer.attn, name, None)  # free the old cache before allocating the new one
                shape = (batch, c.num_kv_heads, max_len, c.head_dim)
                setattr(layer.attn, name, torch.zeros(shape, dtype=weight.dtype, device=weight.device))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        c = self.config
        x = self.embed_tokens(tokens)
        cos, sin = rotary_tables(c, positions, x.dtype)
        max_len = self.layers[0].attn.k_cache.shape[2]
        visible = positions[:, None] >= torch.arange(max_len, device=positions.device)[None, :]  # (L, max_len)
        if tokens.shape[1] == 1:  # decode (see CachedAttention): additive, in the activations' dtype
            mask = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, float("-inf"))
        else:
            mask = visible.repeat(c.num_heads // c.num_kv_heads, 1)  # rows in the folded (group * L) order
        for layer in self.layers:
            x = layer(x, cos, sin, positions, mask)
        return self.lm_head(self.norm(x[:, -1:]))
