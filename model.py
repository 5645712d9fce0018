"""
A LLaMA-style decoder in one file: RMSNorm, rotary embeddings (with the context-extending
scalings llama3, linear, dynamic NTK and YaRN), grouped-query attention, SwiGLU (or a mixture of SwiGLU experts),
a KV cache and a sampler. Past a size, the loss is computed without the whole logits (logprobs_of). Rows that
pack several documents take per-token positions and document ids: each document attends
only to itself, with its positions starting at 0. generate_batch samples n completions of several
prompts of different lengths in one batch and one KV cache, each row at its own positions.

Imports torch and the standard library only, so it can be copied into another project
alone. Weight layout follows Hugging Face's LlamaForCausalLM (rotate-half RoPE; a mixture, Mixtral's or
Qwen2-MoE's), so conversion to and from transformers is a pure renaming of tensors (see convert_hf.py).
"""
import math
import os
import pickle
import zipfile
from dataclasses import dataclass, fields, replace
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class ModelError(ValueError):
    """Bad input to the model: a config, a checkpoint or a prompt that cannot work. Scripts report
    it as one line; other exceptions are bugs and keep their traceback."""


@dataclass
class ModelConfig:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4          # < n_heads: grouped-query attention; == n_heads: plain MHA
    vocab_size: int = 6400
    hidden_dim: Optional[int] = None  # SwiGLU width; None: LLaMA's 8/3 * dim rule
    multiple_of: int = 64        # hidden_dim is rounded up to a multiple of this
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type", "factor", ...} as transformers spells them (see rope_frequencies):
    #   llama3   low_freq_factor, high_freq_factor, original_max_position_embeddings (no rope_type: llama3)
    #   linear   positions divided by factor
    #   dynamic  original_max_position_embeddings: beyond it the base grows with the sequence (NTK-aware)
    #   yarn     original_max_position_embeddings, optional beta_fast, beta_slow, attention_factor, truncate
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 512
    tie_embeddings: bool = True
    dropout: float = 0.0
    # mixture of experts (MoE): n_experts > 0 makes each layer's feed-forward (after the first first_dense_layers)
    # n_experts SwiGLU experts of width moe_hidden_dim (None: hidden_dim), each token routed to the
    # n_experts_per_tok with the highest router probabilities and their outputs summed with those weights
    n_experts: int = 0
    n_experts_per_tok: int = 2
    n_shared_experts: int = 0    # every token also passes one SwiGLU of n_shared_experts * moe_hidden_dim
    moe_hidden_dim: Optional[int] = None
    norm_topk_prob: bool = True  # the chosen k weights renormalised to sum to 1 (Mixtral); False: raw (Qwen2-MoE)
    shared_expert_gate: bool = False  # the shared expert's output scaled by sigmoid(a learned gate) (Qwen2-MoE)
    first_dense_layers: int = 0  # layers before the first MoE one keep a dense feed-forward (DeepSeek)
    router_aux_loss_coef: float = 0.01  # training: Switch/Mixtral load-balancing loss, joined to the model's loss
    router_z_loss_coef: float = 0.001   # training: ST-MoE's router z-loss (keeps router logits small)

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ModelError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.hidden_dim is None:
            hidden = int(2 * 4 * self.dim / 3)
            self.hidden_dim = self.multiple_of * math.ceil(hidden / self.multiple_of)
        if self.n_experts:
            self.moe_hidden_dim = self.moe_hidden_dim or self.hidden_dim
            if not 1 <= self.n_experts_per_tok <= self.n_experts:
                raise ModelError(f"n_experts_per_tok {self.n_experts_per_tok} must be between 1 and n_experts "
                                 f"{self.n_experts}")
            if self.n_experts_per_tok == 1 and self.norm_topk_prob:
                raise ModelError("n_experts_per_tok 1 with norm_topk_prob: every token's weight would be 1 and the "
                                 "router would learn nothing from the loss; set norm_topk_prob false (Switch)")
            if not 0 <= self.first_dense_layers < self.n_layers:
                raise ModelError(f"first_dense_layers {self.first_dense_layers} leaves no MoE layer of "
                                 f"{self.n_layers}")

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_experts > 0 and layer >= self.first_dense_layers

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelError(f"unknown model config fields: {', '.join(unknown)}")
        return cls(**d)


# Above this many bytes of float32 logits, the loss is computed a chunk of rows at a time (Transformer.logprobs_of)
LOSS_CHUNK_BYTES = 2**27
ONEDNN = torch.backends.mkldnn.is_available()  # oneDNN's CPU kernels (x86 and Arm builds of torch)


class Linear(nn.Linear):
    """A bias-free nn.Linear with faster products for inference on a CPU, where batch-1 decoding is nothing but
    matrix-vector products and BLAS's (MKL's) for a weight stored (out, in) runs at a quarter of memory speed or
    less (and slower still for a few rows). In a compiled decode step of one row the product is written as an
    elementwise product and a sum over the input side, which the compiler makes one vectorised pass over the
    weight's rows split between the threads, at about memory speed (SmolLM2-135M shape, 2 threads: 27 -> 76
    tokens/s); otherwise without gradients, oneDNN's linear (about twice BLAS's speed for a few rows)."""

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, bias=False, **kwargs)

    def forward(self, x):
        if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
            if torch.compiler.is_compiling():  # (the compiler cannot lower oneDNN's linear with a plain weight)
                if x.shape[:-1].numel() == 1:
                    return (x.unsqueeze(-2) * self.weight).sum(-1)  # (..., 1, in) * (out, in) -> (..., out)
            elif ONEDNN:
                out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, None,
                                                         "none", [], "")
                return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 even under autocast: the mean of squares overflows fp16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * xf.to(x.dtype)
        # Under autocast hand the matmuls one low-precision copy: left to autocast, q, k and v
        # (and gate and up) would each make and keep their own.
        if torch.is_autocast_enabled(x.device.type):
            out = out.to(torch.get_autocast_dtype(x.device.type))
        return out


def rope_frequencies(cfg: ModelConfig, seq_len: int = 0) -> "tuple[torch.Tensor, float]":
    """(inverse frequencies (head_dim / 2,), attention factor that scales cos and sin) of the rotary
    embedding, with the configured scaling, numerically as transformers computes them. seq_len is the
    sequence's length, which only dynamic scaling depends on."""
    d, theta, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling or {}
    kind = s.get("rope_type", "llama3") if s else "default"
    if kind == "dynamic" and seq_len > s["original_max_position_embeddings"]:
        # NTK-aware: a larger base stretches the low frequencies more than the high ones, as the sequence grows
        stretch = s["factor"] * seq_len / s["original_max_position_embeddings"] - (s["factor"] - 1)
        theta = theta * stretch ** (d / (d - 2))
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "llama3":
        return llama3_frequencies(inv_freq, s), 1.0
    if kind == "yarn":
        return yarn_frequencies(inv_freq, d, theta, s)
    if kind not in ("default", "dynamic"):
        raise ModelError(f"unknown rope scaling type {kind!r}: llama3, linear, dynamic or yarn")
    return inv_freq, 1.0


def llama3_frequencies(inv_freq, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept,
    # and the band in between is blended smoothly.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


def yarn_frequencies(inv_freq, d: int, theta: float, s: dict) -> "tuple[torch.Tensor, float]":
    """YaRN (Peng et al. 2023): dimensions that turn more than beta_fast times over the original context keep
    their frequency (extrapolated), those turning less than beta_slow times are divided by factor
    (interpolated), with a linear ramp between; attention logits get sharper by the factor 0.1 ln(factor) + 1."""
    factor, old_len = s["factor"], s["original_max_position_embeddings"]

    def dim_of(rotations):  # the dimension that turns `rotations` times over the original context
        return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.get("beta_fast") or 32), dim_of(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high += 0.001 if high == low else 0  # no division by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention = s.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, attention


def rope_tables(cfg: ModelConfig, length: int, seq_len: int = 0) -> tuple:
    """(cos, sin), each (length, head_dim): the rotation of every position below length."""
    inv_freq, attention = rope_frequencies(cfg, seq_len)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * attention, angles.sin() * attention


def document_mask(document_ids):
    """(B, 1, T, T) bool attention mask for packed rows: query i sees key j when j <= i and both
    belong to the same document (document_ids: (B, T), equal ids on a contiguous run)."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]  # every query sees at least itself: no row is all -inf


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values for every layer, so decoding never recomputes the prefix.
    Its size is fixed (max_len, default the model's context): new keys are written at their
    positions and attention reads the whole cache, masked to the positions written so far, so a
    decode step has the same shapes at every position (one compiled graph serves them all)."""

    def __init__(self, cfg: ModelConfig, batch_size: int = 1, device=None, dtype=torch.float32,
                 max_len: Optional[int] = None):
        self.max_len = min(max_len or cfg.max_seq_len, cfg.max_seq_len)
        shape = (batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = 0  # positions stored by calls that did not give theirs (see Transformer.forward)

    def rows(self, start: int, stop: int) -> "KVCache":
        """Rows start to stop - 1 as a cache whose keys and values are views of this cache's: a forward through it
        (a prompt's prefill into one row, a decode step of the first rows) writes those rows here and leaves the
        others alone."""
        part = object.__new__(KVCache)  # no new tensors
        part.max_len, part.pos = self.max_len, 0
        part.k, part.v = [k[start:stop] for k in self.k], [v[start:stop] for v in self.v]
        return part


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.dropout = cfg.dropout
        self.wqkv = None  # wq, wk and wv stacked into one layer for generation (fuse_projections)

    def forward(self, x, cos, sin, cache: Optional[KVCache] = None, layer: int = 0, mask=None, positions=None):
        B, T, _ = x.shape  # x: (B, T, dim); cos, sin: (T, head_dim), or (B, 1, T, head_dim) for packed rows
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split([self.wq.out_features, self.wk.out_features, self.wv.out_features], dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.n_heads // self.n_kv_heads
        if cache is not None:  # store the new keys at their positions, attend to the whole cache
            if positions.dim() == 1:  # (T,): the same positions in every row
                cache.k[layer].index_copy_(2, positions, k)
                cache.v[layer].index_copy_(2, positions, v)
            else:  # (B, T): each row at its own positions (generate_batch)
                where = positions[:, None, :, None].expand(-1, self.n_kv_heads, -1, self.head_dim)
                cache.k[layer].scatter_(2, where, k)
                cache.v[layer].scatter_(2, where, v)
            span = mask.shape[-1]  # (B, n_kv_heads, span, head_dim) each:
            k, v = cache.k[layer][:, :, :span], cache.v[layer][:, :, :span]
            # GQA without copying the cache per query head: each key/value head's group of query heads
            # become rows of one query block, and the (T, max_len) or (B, T, max_len) position mask is repeated
            q = q.reshape(B, self.n_kv_heads, group * T, self.head_dim)  # rows ordered (head in group, t)
            mask = mask.repeat(group, 1) if mask.dim() == 2 else mask.repeat(1, group, 1)[:, None]
            if x.device.type == "cpu" and torch.compiler.is_compiling():  # SDPA's CPU kernel costs ~60 us a
                # call at these tiny shapes, a tenth of a token's time; written out, it compiles into a few loops
                scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, n_kv_heads, group * T, span)
                out = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = out.view(B, self.n_heads, T, self.head_dim)
        else:
            if mask is not None and group > 1:  # the fused kernels that take a mask do not do GQA (SDPA would
                # fall back to one that stores every T x T score): give them a key and value per query head
                k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))  # (B, n_heads, T, head_dim)
            # GQA: each group of n_heads / n_kv_heads query heads shares one key/value head; a packed row's
            # document mask (B, 1, T, T) is causal already
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=mask is None and group > 1)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # heads side by side again: (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up projection (both dim -> hidden_dim),
    w2 the down projection back to dim; the names are Meta's LLaMA code's (transformers: gate_proj,
    up_proj, down_proj)."""

    def __init__(self, cfg: ModelConfig, hidden_dim: Optional[int] = None):
        super().__init__()
        hidden_dim = hidden_dim or cfg.hidden_dim
        self.w1 = Linear(cfg.dim, hidden_dim)  # gate
        self.w2 = Linear(hidden_dim, cfg.dim)  # down
        self.w3 = Linear(cfg.dim, hidden_dim)  # up
        self.w13 = None  # w1 and w3 stacked into one layer for generation (fuse_projections)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1) if self.w13 is not None else (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


class MoE(nn.Module):
    """A mixture of SwiGLU experts (Switch, Mixtral, Qwen2-MoE): a router scores the experts for each token
    (softmax), the token goes to its top n_experts_per_tok, and their outputs are summed weighted by those
    probabilities (renormalised over the chosen ones with norm_topk_prob), plus an optional shared expert
    that every token passes. Dropless: tokens are grouped by expert and every group runs, whatever its size.
    In training it keeps aux_loss (the balancing and z-losses, weighted) and load (tokens each expert got)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Linear(cfg.dim, cfg.n_experts)
        self.experts = nn.ModuleList(FeedForward(cfg, cfg.moe_hidden_dim) for _ in range(cfg.n_experts))
        self.shared = FeedForward(cfg, cfg.n_shared_experts * cfg.moe_hidden_dim) if cfg.n_shared_experts else None
        self.shared_gate = Linear(cfg.dim, 1) if cfg.shared_expert_gate else None
        self.aux_loss, self.load = None, None

    def forward(self, x):
        c, shape = self.cfg, x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim): every token of the batch
        logits = self.router(x).float()  # (N, n_experts)
        probs = logits.softmax(-1)
        weights, chosen = probs.topk(c.n_experts_per_tok, dim=-1)  # (N, k) each
        if c.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        if torch.compiler.is_compiling() and not self.training:
            # a compiled decode step has fixed shapes, so no groups of varying size: every expert runs on the
            # few tokens and an expert that was not chosen gets weight 0
            dense = torch.zeros_like(probs, dtype=x.dtype).scatter(-1, chosen, weights)  # (N, n_experts)
            out = sum(expert(x) * dense[:, e, None] for e, expert in enumerate(self.experts))
        else:
            out, ran = self.grouped(x, chosen, weights)
            if self.training:
                self.load = ran  # the log checks that it adds up to every token's k experts (dropless)
                # Switch's balancing loss: n_experts * sum_e (share of the N*k choices that went to e) * (mean
                # router probability of e); k at perfect balance. ST-MoE's z-loss: mean squared logsumexp.
                balance = c.n_experts * (ran / x.shape[0] * probs.mean(0)).sum()
                z = torch.logsumexp(logits, -1).square().mean()
                self.aux_loss = c.router_aux_loss_coef * balance + c.router_z_loss_coef * z
        if self.shared is not None:
            shared = self.shared(x)
            out = out + (shared * torch.sigmoid(self.shared_gate(x)) if self.shared_gate is not None else shared)
        return out.view(shape)

    # torch.compile (training) would recompile for every size of every group: these few lines run eagerly
    @torch.compiler.disable
    def grouped(self, x, chosen, weights):
        """(the experts' weighted sum for each token (N, dim), the tokens each expert ran (n_experts,))."""
        k = self.cfg.n_experts_per_tok
        order = chosen.flatten().argsort(stable=True)  # the N*k (token, choice) pairs ordered by expert
        load = chosen.flatten().bincount(minlength=self.cfg.n_experts)  # (n_experts,) pairs of each expert
        out, ran = torch.zeros_like(x), []
        for expert, pairs in zip(self.experts, order.split(load.tolist())):
            token = pairs // k  # pair i is token i // k's (i % k)-th choice
            out.index_add_(0, token, (expert(x[token]) * weights.flatten()[pairs, None]).to(out.dtype))
            ran.append(len(token))
        return out, torch.tensor(ran, dtype=torch.float, device=x.device)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoE(cfg) if cfg.is_moe_layer(layer) else FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, cache=None, mask=None, positions=None):
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, cache, self.layer, mask, positions))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.grad_checkpointing = False  # recompute each block in backward to save activations
        self.compiled_decoding, self.decode_caches = False, {}  # see compile_decoding
        self.moe = [block.feed_forward for block in self.layers if cfg.is_moe_layer(block.layer)]  # (not registered)
        if self.moe:  # in training, the tokens each expert of each MoE layer ran, and the tokens routed (each to
            # n_experts_per_tok experts), summed until the loop reads them (train.py's log) and clears them
            self.register_buffer("expert_load", torch.zeros(len(self.moe), cfg.n_experts), persistent=False)
            self.register_buffer("routed_tokens", torch.zeros(()), persistent=False)
        cos, sin = rope_tables(cfg, cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # Residual projections are scaled down so the residual stream's variance does not
        # grow with depth (GPT-2 / nanoGPT).
        for name, p in self.named_parameters():
            if name.endswith(("attention.wo.weight", ".w2.weight")):  # (every expert's too)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, tokens, targets=None, loss_weight=None, cache: Optional[KVCache] = None,
                last_only: bool = False, positions=None, document_ids=None, logits_at=None, keep_logits=False,
                target_logprobs=False, temperature: float = 1.0):
        """Return (logits, loss). Targets equal to -100 are ignored; with targets whose logits would exceed
        LOSS_CHUNK_BYTES the loss is computed in chunks (logprobs_of) and logits is None, unless keep_logits.
        target_logprobs: (None, log p(target) (B, T) float32 at temperature, 0 where the target is -100) instead,
        chunked alike (DPO's and GRPO's losses). With loss_weight (same
        shape as targets), each token's loss is multiplied by its weight and the sum is
        divided by the number of trained (non -100) tokens, not by the sum of weights, so
        a weight of 10 makes that token count ten times as much as an ordinary one.
        A packed row gives positions (B, T), each document's counting from 0, and
        document_ids (B, T): then each token attends only to its own document.
        With a KV cache, positions (T,) say where the new tokens go, or (B, T) where each row's go (rows of
        different lengths); not given, they follow the cache.pos tokens stored so far, and cache.pos advances
        (the compiled decode step gives its position as a tensor instead: a Python number would be compiled
        into the graph). logits_at (B,): only the logits at that position of each row (B, 1, vocab_size)."""
        B, T = tokens.shape
        if document_ids is not None and (positions is None or cache is not None) or \
                positions is not None and document_ids is None and cache is None:
            raise ModelError("packed rows need both positions and document_ids, and no KV cache")
        h = self.dropout(self.tok_embeddings(tokens))
        mask = None
        if cache is not None and positions is None:
            if cache.pos + T > cache.max_len:
                raise ModelError(f"sequence of {cache.pos + T} tokens exceeds the KV cache's {cache.max_len} positions")
            positions = torch.arange(cache.pos, cache.pos + T, device=h.device)
            cache.pos += T
        if positions is None and T > self.cfg.max_seq_len:
            raise ModelError(f"sequence of {T} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
        cos_table, sin_table = self.rope_cos, self.rope_sin
        scaling = self.cfg.rope_scaling or {}
        if scaling.get("rope_type") == "dynamic":
            length = T if positions is None else int(positions.max()) + 1
            if length > scaling["original_max_position_embeddings"]:
                # its frequencies depend on the sequence's length: recomputed for this one (as transformers
                # does; keys already in a KV cache keep the rotation they were stored with)
                cos_table, sin_table = (t.to(h.device) for t in rope_tables(self.cfg, length, length))
        if positions is None:
            cos, sin = cos_table[:T], sin_table[:T]  # (T, head_dim)
        else:  # (T, head_dim), or (B, 1, T, head_dim) for positions per row (packed rows, generate_batch)
            cos, sin = cos_table[positions], sin_table[positions]
            if positions.dim() == 2:
                cos, sin = cos[:, None], sin[:, None]
        cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        if cache is not None:  # the keys stored so far: (T, span), or (B, T, span). Eager reads only the cache's
            # filled part; a compiled step reads all of it, the same shapes at every position (one graph for all)
            span = cache.max_len if torch.compiler.is_compiling() else int(positions.max()) + 1
            mask = torch.arange(span, device=h.device) <= positions[..., None]
        elif document_ids is not None:
            mask = document_mask(document_ids)
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                h = checkpoint(layer, h, cos, sin, None, mask, use_reentrant=False)
            else:
                h = layer(h, cos, sin, cache, mask, positions)
        h = self.norm(h)
        if last_only:
            h = h[:, -1:]
        elif logits_at is not None:
            h = h[torch.arange(B, device=h.device), logits_at][:, None]  # (B, 1, dim)
        if self.moe and self.training:
            self.expert_load += torch.stack([m.load for m in self.moe])
            self.routed_tokens += B * T
        if targets is None:
            return self.output(h), None
        whole = 4 * targets.numel() * self.cfg.vocab_size <= LOSS_CHUNK_BYTES or keep_logits
        if target_logprobs:
            return None, self.logprobs_of(h, targets, temperature, whole)
        if not whole:  # Transformer.loss, from log-probabilities computed a chunk at a time
            nll = -self.logprobs_of(h, targets, whole=False)
            return None, self.trained_mean(nll.reshape(-1), targets, loss_weight) + self.router_loss()
        logits = self.output(h)
        return logits, self.loss(logits, targets, loss_weight) + self.router_loss()

    def router_loss(self):
        """In training, a mixture of experts' balancing and z-losses (weighted), averaged over its layers; else 0."""
        return sum(m.aux_loss for m in self.moe) / len(self.moe) if self.moe and self.training else 0.0

    def logprobs_of(self, h, targets, temperature: float = 1.0, whole: bool = True):
        """log p(target) (B, T) float32 of the final hidden states h (B, T, dim) through the output head at
        temperature, 0 where the target is -100. Not whole: a chunk of rows at a time, and backward recomputes
        each chunk's logits (checkpoint), so one chunk's logits and their gradient exist at once, not the batch's
        (gigabytes with a 128k vocabulary): the same values and gradients, up to the order of the sums."""
        def chunk(h, targets):  # (rows, dim), (rows,) -> (rows,)
            logits = self.output(h).float() / temperature
            return -F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
        h, flat = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        if whole:
            return chunk(h, flat).view(targets.shape)
        rows = max(1, LOSS_CHUNK_BYTES // (4 * self.cfg.vocab_size))
        return torch.cat([checkpoint(chunk, h[i:i + rows], flat[i:i + rows], use_reentrant=False)
                          for i in range(0, len(flat), rows)]).view(targets.shape)

    @staticmethod
    def loss(logits, targets, loss_weight=None):
        per_token = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                    ignore_index=-100, reduction="none")
        return Transformer.trained_mean(per_token, targets, loss_weight)

    @staticmethod
    def trained_mean(per_token, targets, loss_weight=None):
        """The per-token losses (rows,), each times its weight, summed and divided by the trained tokens' count."""
        n = (targets.reshape(-1) != -100).sum().clamp(min=1)
        if loss_weight is not None:
            per_token = per_token * loss_weight.reshape(-1).to(per_token.dtype)
        return per_token.sum() / n

    def num_params(self, embedding: bool = True, active: bool = False) -> int:
        """Weights, tied ones counted once; active: only those a token uses (its k routed experts of each MoE layer)."""
        n = sum(p.numel() for p in self.parameters())
        if active and self.moe:
            idle = self.cfg.n_experts - self.cfg.n_experts_per_tok
            n -= sum(idle * sum(p.numel() for p in moe.experts[0].parameters()) for moe in self.moe)
        return n if embedding else n - self.tok_embeddings.weight.numel()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight that takes part in a
        matmul (of an MoE layer, the token's own experts only), plus attention's score and value products
        (PaLM appendix B)."""
        c = self.cfg
        head = c.vocab_size * c.dim if c.tie_embeddings else 0
        matmul_params = self.num_params(embedding=False, active=True) + head
        return 6 * matmul_params + 12 * c.n_layers * c.dim * seq_len

    def new_cache(self, batch_size: int = 1, max_len: Optional[int] = None) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.cfg, batch_size, p.device, p.dtype, max_len)

    def decode_cache(self, length: int, batch_size: int = 1) -> KVCache:
        """A KV cache for a generation of `length` tokens. Eager: exactly that long. Compiled
        (compile_decoding): a power of two of at least 256, kept and reused, so a few compiled
        graphs serve every length and CUDA graphs find the cache at the same address each time."""
        if not self.compiled_decoding:
            return self.new_cache(batch_size, max_len=length)
        length = min(max(256, 1 << (length - 1).bit_length()), self.cfg.max_seq_len)
        if (batch_size, length) not in self.decode_caches:
            cache = self.decode_caches[batch_size, length] = self.new_cache(batch_size, max_len=length)
            for t in cache.k + cache.v:
                torch._dynamo.mark_static_address(t)
        return self.decode_caches[batch_size, length]

    def decode_step(self, token, position, cache: KVCache):
        """Logits (B, vocab_size) after one token per row (B, 1) at position (1,), or each row's own (B, 1), all
        tensors: the shapes are the same at every position, so compile_decoding compiles this once per batch."""
        return self(token, cache=cache, positions=position, last_only=True)[0][:, -1].float()

    @torch.no_grad()
    def generate_stream(self, prompt: Sequence[int], max_new_tokens: int = 128, temperature: float = 1.0,
                        top_k: Optional[int] = None, top_p: Optional[float] = None,
                        repetition_penalty: float = 1.0, stop_ids: Sequence[int] = (),
                        generator: Optional[torch.Generator] = None) -> Iterator[int]:
        """Yield new token ids one at a time (batch 1). temperature 0 is greedy. Stops at a
        stop id (which is yielded), after max_new_tokens, or when the context is full."""
        prompt = self.checked_prompt(prompt)
        steps = min(max_new_tokens, self.cfg.max_seq_len - len(prompt))
        was_training = self.training
        self.eval()
        device = self.tok_embeddings.weight.device
        cache = self.decode_cache(len(prompt) + steps)
        seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(prompt, device=device)] = True
        stop = set(stop_ids)
        try:  # the prompt in one eager forward (its length varies), then one decode step per token
            logits = self(torch.tensor([prompt], device=device), cache=cache,
                          positions=torch.arange(len(prompt), device=device), last_only=True)[0][0, -1].float()
            for position in range(len(prompt), len(prompt) + steps):
                nxt = sample(logits, temperature, top_k, top_p, repetition_penalty, seen, generator)
                yield nxt
                if nxt in stop or position == len(prompt) + steps - 1:
                    break
                seen[nxt] = True
                logits = self.decode_step(torch.tensor([[nxt]], device=device),
                                          torch.tensor([position], device=device), cache)[0]
        finally:
            self.train(was_training)

    def generate(self, prompt: Sequence[int], **kwargs) -> list:
        return list(self.generate_stream(prompt, **kwargs))

    def checked_prompt(self, prompt: Sequence[int]) -> list:
        prompt = list(prompt)
        if not prompt:
            raise ModelError("empty prompt")
        if len(prompt) >= self.cfg.max_seq_len:
            raise ModelError(f"prompt of {len(prompt)} tokens does not fit max_seq_len "
                             f"{self.cfg.max_seq_len} (leave room for at least one new token)")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ModelError(f"prompt token id {bad[0]} is outside the model's vocabulary of {self.cfg.vocab_size}")
        return prompt

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[Sequence[int]], n: int = 1, max_new_tokens: int = 128,
                       temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                       repetition_penalty: float = 1.0, stop_ids: Sequence[int] = (),
                       generator: Optional[torch.Generator] = None) -> list:
        """n completions of each prompt, generated together: one batch of len(prompts) * n rows (the first
        prompt's n, then the next's) and one KV cache, each row at its own positions, so that a row is what
        generate gives its prompt alone (greedy: the same tokens; sampled: drawn row by row from `generator`, so
        a seed repeats them). Returns each row's new ids, up to and including its stop id. The batch runs until
        every row has stopped (a stopped row is carried along), or for max_new_tokens, at most what the longest
        prompt leaves of the context."""
        if not prompts or n < 1:
            raise ModelError(f"generate_batch needs at least one prompt and n >= 1, got {len(prompts)} and n={n}")
        rows = [self.checked_prompt(p) for p in prompts for _ in range(n)]
        lengths = [len(p) for p in rows]
        B, longest = len(rows), max(lengths)
        steps = min(max_new_tokens, self.cfg.max_seq_len - longest)
        was_training = self.training
        self.eval()
        device = self.tok_embeddings.weight.device
        cache = self.decode_cache(longest + steps, B)
        seen = torch.zeros(B, self.cfg.vocab_size, dtype=torch.bool, device=device)
        for b, prompt in enumerate(rows):
            seen[b, torch.tensor(prompt, device=device)] = True
        stop, out, done = set(stop_ids), [[] for _ in rows], [False] * B
        position = torch.tensor(lengths, device=device)[:, None]  # (B, 1): where each row's next token goes
        try:  # the prompts right-padded into one forward (a row's padding lies past its last position, where
            # its own new tokens overwrite it before anything reads it), then one decode step for every row
            padded = torch.tensor([p + [0] * (longest - len(p)) for p in rows], device=device)  # (B, longest)
            logits = self(padded, cache=cache, positions=torch.arange(longest, device=device).expand(B, -1),
                          logits_at=position[:, 0] - 1)[0][:, -1].float()  # (B, vocab_size)
            for step in range(steps):
                nxt = [0 if done[b] else sample(logits[b], temperature, top_k, top_p, repetition_penalty, seen[b],
                                                generator) for b in range(B)]
                for b in range(B):
                    if not done[b]:
                        out[b].append(nxt[b])
                        seen[b, nxt[b]] = True
                        done[b] = nxt[b] in stop
                if all(done) or step == steps - 1:
                    break
                logits = self.decode_step(torch.tensor(nxt, device=device)[:, None], position, cache)
                position = position + 1
        finally:
            self.train(was_training)
        return out


def sample(logits, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0,
           seen=None, generator=None) -> int:
    """Pick one token id from a 1-D logits vector (same conventions as transformers)."""
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Drop a token once the tokens before it already cover top_p; the first always stays.
        drop = (sorted_p.cumsum(0) - sorted_p) > top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def load_state_dict_checked(model: nn.Module, state: dict, source: str = "checkpoint"):
    """load_state_dict with one-line errors that name the tensor and both shapes."""
    expected = model.state_dict()
    for name, tensor in state.items():
        if name not in expected:
            raise ModelError(f"{source}: unexpected tensor {name} (shape {tuple(tensor.shape)})")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ModelError(f"{source}: tensor {name} has shape {tuple(tensor.shape)} but the config "
                             f"expects {tuple(expected[name].shape)}")
    missing = [n for n in expected if n not in state]
    if missing:
        raise ModelError(f"{source}: missing tensor {missing[0]}" +
                         (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model.load_state_dict(state)


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load with weights_only=True (never run a checkpoint's pickled code) and a
    clear message for missing, truncated or foreign files."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such checkpoint") from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"{path}: not a readable checkpoint (corrupt or truncated?): {detail}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ModelError(f"{path}: not a checkpoint of this project (no 'model' and 'config' entries)")
    return ckpt


def nonfinite_tensor(state: dict) -> Optional[str]:
    """The name of the first floating-point tensor holding a NaN or inf, or None."""
    return next((name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def save_checkpoint(ckpt: dict, path: str):
    """Write to a temporary file and rename it into place, so a crash mid-write never leaves
    a truncated file under the real name (the rename is atomic on POSIX and Windows).
    Non-finite weights are refused: they would replace a good checkpoint with a useless one."""
    bad = nonfinite_tensor(ckpt["model"])
    if bad:
        raise FloatingPointError(f"not writing {path}: {bad} has non-finite values")
    tmp = f"{path}.tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed: drop the half-written file, keep the old one
            os.remove(tmp)


CONTEXT_SCALINGS = ("none", "linear", "dynamic", "yarn")


def extend_context(model: Transformer, max_seq_len: int, scaling: str, factor: float = 0.0) -> Transformer:
    """The same weights with a context of max_seq_len tokens, beyond the max_seq_len the model was trained at,
    its RoPE scaled by `factor` (0: the new over the trained length) with one of CONTEXT_SCALINGS ("none":
    unscaled positions past the trained ones, the baseline that scaling should beat)."""
    trained = model.cfg.max_seq_len
    if scaling not in CONTEXT_SCALINGS:
        raise ModelError(f"rope scaling {scaling!r}: use one of {', '.join(CONTEXT_SCALINGS)}")
    if max_seq_len <= trained:
        raise ModelError(f"extending the context needs a length above the model's {trained} tokens, not {max_seq_len}")
    if model.cfg.rope_scaling and scaling != "none":
        raise ModelError(f"the model's RoPE is scaled already ({model.cfg.rope_scaling}): extend the original")
    rope = dict(model.cfg.rope_scaling or {})
    if scaling != "none":
        rope = {"rope_type": scaling, "factor": factor or max_seq_len / trained}
        if scaling != "linear":
            rope["original_max_position_embeddings"] = trained
    longer = Transformer(replace(model.cfg, max_seq_len=max_seq_len, rope_scaling=rope or None))
    longer.load_state_dict(model.state_dict())  # RoPE's tables are buffers of the config, not weights
    longer.extended_from = trained  # for the training loop's loss-by-position report
    return longer.to(model.tok_embeddings.weight.device)


@torch.no_grad()
def stack_linears(linears: list) -> Optional[nn.Module]:
    """One layer giving the outputs of several bias-free linear layers of the same input side by side, their
    weights stacked along rows; the layers then hold views of those rows, so nothing is stored twice. A layer
    kind other than nn.Linear stacks itself with a `stacked` class method (quantize.Int8Linear); None if not."""
    first = linears[0]
    if not isinstance(first, nn.Linear):
        return first.stacked(linears) if hasattr(first, "stacked") else None
    rows = torch.cat([layer.weight for layer in linears])
    fused = Linear(first.in_features, rows.shape[0], device=rows.device, dtype=rows.dtype)
    fused.weight = nn.Parameter(rows, requires_grad=False)
    for layer, view in zip(linears, rows.split([layer.out_features for layer in linears])):
        layer.weight = nn.Parameter(view, requires_grad=False)
    return fused


def fuse_projections(model: Transformer) -> Transformer:
    """For generation: each layer's wq, wk and wv become one layer, and w1 and w3 another, so a token takes 3
    matrix-vector products per layer instead of 7 (batch-1 decoding pays a fixed cost per product on a CPU,
    per kernel launch on a GPU). The state_dict and parameters() are unchanged (the stacked layers are not
    registered); move the model to its device and dtype first, and do not train it afterwards."""
    for block in model.layers:
        attention = block.attention
        # object.__setattr__: nn.Module would register them as submodules, saved and counted twice
        object.__setattr__(attention, "wqkv", stack_linears([attention.wq, attention.wk, attention.wv]))
        for ffn in block.feed_forward.modules():  # the layer's SwiGLU, or each expert of a mixture
            if isinstance(ffn, FeedForward):
                object.__setattr__(ffn, "w13", stack_linears([ffn.w1, ffn.w3]))
    return model


def compile_decoding(model: Transformer, mode: Optional[str] = None) -> Transformer:
    """Compile the model's decode step with torch.compile: one graph for every position (the KV
    cache has a fixed size and the position is a tensor), the norms, RoPE and SwiGLU fused around
    the matmuls, the projections stacked (fuse_projections); on CUDA mode "reduce-overhead" replays
    it as a CUDA graph, one launch per token. The first generation of each cache size compiles
    (seconds to a minute); greedy output is the eager path's. For generation only: see fuse_projections."""
    if (model.cfg.rope_scaling or {}).get("rope_type") == "dynamic":
        raise ModelError("compiled decoding needs fixed RoPE tables; dynamic scaling recomputes them "
                         "for every length: decode without compiling")
    fuse_projections(model)
    if mode is None and not model.tok_embeddings.weight.is_cuda:
        # CPU: the generated code calls its kernels from C++ rather than Python, faster per token
        compiled = torch.compile(model.decode_step, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    else:
        compiled = torch.compile(model.decode_step, mode=mode or "reduce-overhead", fullgraph=True, dynamic=False)
    model.decode_step = compiled
    model.compiled_decoding = True
    return model


def empty_model(cfg: ModelConfig) -> Transformer:
    """A Transformer holding no weights yet (meta tensors: no memory) but real buffers, to be filled one tensor at
    a time with load_state_dict(..., assign=True): a large model imported or loaded without a second copy."""
    with torch.device("meta"):
        model = Transformer(cfg)
    for name, buffer in model.named_buffers(recurse=False):
        setattr(model, name, torch.zeros_like(buffer, device="cpu"))
    model.rope_cos, model.rope_sin = rope_tables(cfg, cfg.max_seq_len)
    return model


def model_from_checkpoint(ckpt: dict, path: str) -> Transformer:
    """The Transformer of a checkpoint of whole float weights (read_checkpoint's dict, read from path). Adapters
    and int8 weights are refused in one line that says what reads them."""
    if ckpt.get("quantization"):
        raise ModelError(f"{path} holds {ckpt['quantization']} weights, for inference only (inference.py, "
                         f"inference_sft.py, serve.py): use the float checkpoint it came from "
                         f"({ckpt.get('source', '?')})")
    if "nf4" in ckpt:  # convert_hf.py --from_hf --base_quant nf4
        raise ModelError(f"{path} holds a 4-bit NF4 base: lora.py reads it (lora.load_merged)")
    if "lora" in ckpt:  # written by a LoRA run of this project (lora.py): adapters only
        raise ModelError(f"{path} holds LoRA adapters, not a whole model: merge them into their base first "
                         f"(python convert_hf.py --merge_lora {path})")
    model = Transformer(ModelConfig.from_dict(ckpt["config"]))
    load_state_dict_checked(model, ckpt["model"], path)
    return model


def load_model(path: str, device="cpu") -> "tuple[Transformer, dict]":
    """(model, checkpoint dict) of a checkpoint file of whole float weights."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, path).to(device), ckpt
