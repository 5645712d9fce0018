"""
LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): fine-tune a model by
training a small low-rank update beside each chosen weight matrix while every original weight stays
frozen. A layer's output becomes W x + (alpha / rank) * B A x, with A (rank x in) Gaussian and B
(out x rank) zero at the start, so step 0 is exactly the base model.

  python train_sft.py --init_from out/base.pt --lora_rank 16          # train_sft.py / distill.py flags
  python convert_hf.py --merge_lora out/sft/best.pt                    # fold the adapters into a plain checkpoint

Why it fits a 12 GB card: the frozen weights need no gradient and no optimizer state, and on CUDA they
are kept in the compute dtype (2 bytes a weight, against 16 for full fine-tuning with AdamW).

A LoRA checkpoint holds only the adapters, plus the path and sha256 of the base checkpoint they were
trained on (megabytes, not gigabytes). load_merged() below gives back the base with the adapters merged
in, so inference and convert_hf.py take a LoRA checkpoint like any other; convert_hf.py --to_peft also
writes the adapters in PEFT's layout. Tokens that convert_hf.py added to an imported tokenizer (the chat
markers) start with no meaning, so their embedding and output rows are trained too (trainable copies
of just those rows, as PEFT's trainable_token_indices).

Imports torch and model.py only: the two files can be copied into another project together.
"""
import contextlib
import hashlib
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import MoE, ModelConfig, ModelError, Transformer, model_from_checkpoint, read_checkpoint

# every attention and MLP projection (transformers: q_proj k_proj v_proj o_proj gate_proj down_proj up_proj). In a
# mixture of experts w1 w2 w3 adapt the dense layers and the shared expert; "experts" adds them to every routed
# expert too (each its own adapters: n_experts times as many)
TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
EXPERTS = "experts"


def adapted_parents(block, targets) -> list:
    """The modules of a block whose projections LoRA adapts: attention and the feed-forward, or in a mixture of
    experts its shared expert and, if targets name "experts", each routed one."""
    ffn = block.feed_forward
    if not isinstance(ffn, MoE):
        return [block.attention, ffn]
    return [block.attention] + ([ffn.shared] if ffn.shared is not None else []) + \
        (list(ffn.experts) if EXPERTS in targets else [])


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus its trainable low-rank update: base(x) + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.normal_(self.lora_A, std=1 / rank)  # the paper's Gaussian A (PEFT's "gaussian" scale)
        # No dropout module at all when it is 0: even p=0 would store a copy of x for backward.
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.enabled = True  # adapters_off() switches it off

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (computed in fp32)."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (out, in)
        self.base.weight.data = (self.base.weight.float() + delta).to(self.base.weight.dtype)
        return self.base


class TrainedRows(nn.Module):
    """A frozen embedding (token ids -> vectors) or output head (vectors -> logits) whose rows `ids` are
    replaced by a trainable copy. A tied head shares the embedding's copy (rows=)."""

    def __init__(self, base, ids, rows: nn.Parameter = None):
        super().__init__()
        self.base = base
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device), persistent=False)
        slot = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=base.weight.device)
        slot[self.ids] = torch.arange(len(ids), device=base.weight.device)
        self.register_buffer("slot", slot, persistent=False)  # token id -> its row in self.rows, or -1
        self.rows = rows if rows is not None else nn.Parameter(base.weight.detach()[self.ids].float().clone())
        self.enabled = True  # adapters_off() switches it off

    @property
    def weight(self):  # what Transformer reads of its embedding (the KV cache's dtype, parameter counts)
        return self.base.weight

    def forward(self, x):
        if not self.enabled:
            return self.base(x)
        if isinstance(self.base, nn.Embedding):  # x: token ids (B, T) -> (B, T, dim)
            out, slot = self.base(x), self.slot[x]
            return torch.where((slot >= 0)[..., None], self.rows[slot.clamp(min=0)].to(out.dtype), out)
        logits = self.base(x)  # x: (B, T, dim) -> (B, T, vocab), the trained rows' logits put in place
        return logits.index_copy(-1, self.ids, F.linear(x, self.rows.to(x.dtype)).to(logits.dtype))

    def merged(self):
        self.base.weight.data[self.ids] = self.rows.detach().to(self.base.weight.dtype)
        return self.base


def add_lora(model: Transformer, rank: int, alpha: float, dropout: float = 0.0, targets=TARGETS,
             new_token_ids=()) -> Transformer:
    """Freeze every weight of `model` and wrap the `targets` projections of every block (in place). The rows
    of new_token_ids (tokens without a trained embedding yet) are trained too."""
    unknown = sorted(set(targets) - set(TARGETS) - {EXPERTS})
    if rank < 1 or not set(targets) & set(TARGETS) or unknown:
        raise ModelError(f"LoRA needs a rank of at least 1 and targets among {','.join(TARGETS)} (and {EXPERTS} for "
                         f"a mixture of experts)" + (f" (unknown: {','.join(unknown)})" if unknown else ""))
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.layers:
        for parent in adapted_parents(block, targets):
            for name in targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    if len(new_token_ids):
        model.tok_embeddings = TrainedRows(model.tok_embeddings, list(new_token_ids))
        tied = model.tok_embeddings.rows if model.cfg.tie_embeddings else None
        model.output = TrainedRows(model.output, list(new_token_ids), rows=tied)
    model.lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets),
                  "new_token_ids": [int(i) for i in new_token_ids]}
    return model


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within the block a LoRA model computes its frozen base alone (adapters and trained rows skipped): the
    base's outputs with no second copy of its weights, e.g. as train_dpo.py's reference model."""
    switched = [m for m in model.modules() if isinstance(m, (LoRALinear, TrainedRows))]
    for m in switched:
        m.enabled = False
    try:
        yield
    finally:
        for m in switched:
            m.enabled = True


def is_lora(model) -> bool:
    return getattr(model, "lora", None) is not None


def cast_frozen(model: Transformer, dtype: torch.dtype):
    """Keep the frozen matrices in the compute dtype (bf16 on CUDA): no fp32 master copy is needed for
    weights that never change. Norms (vectors) and the trainable adapters stay fp32."""
    for p in model.parameters():
        if not p.requires_grad and p.dim() == 2:
            p.data = p.data.to(dtype)


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold the adapters into the weights (in place): a plain Transformer again, with the state_dict names and
    fp32 weights it had before add_lora, every weight trainable."""
    for block in model.layers:
        for parent in adapted_parents(block, [EXPERTS]):
            for name, module in list(parent.named_children()):
                if isinstance(module, LoRALinear):
                    setattr(parent, name, module.merged())
    if isinstance(model.tok_embeddings, TrainedRows):
        model.tok_embeddings = model.tok_embeddings.merged()
        model.output = model.output.merged()  # tied: the same weight again, already holding the rows
    model.float()
    for p in model.parameters():
        p.requires_grad_(True)
    model.lora = None
    return model


def adapter_state(model: Transformer) -> dict:
    """The trained tensors only: what a LoRA checkpoint stores (a tied head's rows once)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def lora_params(model_cfg, rank: int, targets=TARGETS) -> int:
    """Trainable weights of the adapters on a model of this shape (without the few new token rows)."""
    c, kv = model_cfg, model_cfg.n_kv_heads * model_cfg.head_dim
    attention = {"wq": 2 * c.dim, "wk": c.dim + kv, "wv": c.dim + kv, "wo": 2 * c.dim}  # in + out, per adapter
    n_moe = c.n_layers - c.first_dense_layers if c.n_experts else 0
    widths = [c.hidden_dim] * (c.n_layers - n_moe)  # the width of each SwiGLU adapted
    if n_moe:
        widths += [c.n_shared_experts * c.moe_hidden_dim] * (n_moe if c.n_shared_experts else 0) + \
            [c.moe_hidden_dim] * (n_moe * c.n_experts if EXPERTS in targets else 0)
    n_ffn = sum(1 for t in targets if t in ("w1", "w2", "w3"))
    return rank * (c.n_layers * sum(attention.get(t, 0) for t in targets) + n_ffn * sum(c.dim + w for w in widths))


def file_sha256(path: str) -> str:
    """A file's sha256, read a MiB at a time: a LoRA checkpoint records its base's, to refuse any other base."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_entries(model: Transformer, base_path: str) -> dict:
    """What a LoRA checkpoint records to find and check its base."""
    return {**model.lora, "base": base_path, "base_sha256": file_sha256(base_path)}


def with_adapters(ckpt: dict, path: str, base: str = "") -> Transformer:
    """The base model of a LoRA checkpoint with its adapters attached (not merged). `base` overrides the
    recorded path; a base whose file or shape is not the one the adapters were trained on is refused."""
    meta = ckpt["lora"]
    base = base or meta["base"]
    if not os.path.isfile(base):
        raise ModelError(f"{path} holds LoRA adapters for the base {base}, which does not exist (pass its path)")
    if file_sha256(base) != meta["base_sha256"]:
        raise ModelError(f"{path} holds LoRA adapters trained on {meta['base']} (sha256 {meta['base_sha256'][:12]}), "
                         f"but {base} is a different file: give the base they were trained on")
    model, _ = load_merged(base)
    context = ("max_seq_len", "rope_scaling")  # a run may have extended the base's context (no weights change)
    for name, value in ckpt["config"].items():
        if name not in context and getattr(model.cfg, name) != value:
            raise ModelError(f"{path} holds LoRA adapters for a model with {name}={value!r}, but {base} has "
                             f"{name}={getattr(model.cfg, name)!r}")
    if any(getattr(model.cfg, name) != ckpt["config"][name] for name in context):
        longer = Transformer(ModelConfig.from_dict(ckpt["config"]))
        longer.load_state_dict(model.state_dict())
        model = longer
    add_lora(model, meta["rank"], meta["alpha"], meta["dropout"], meta["targets"], meta["new_token_ids"])
    model.lora = {**meta, "base": base}  # what its checkpoints record again, the base's path as found
    load_adapters(model, ckpt["model"], path)
    return model


@torch.no_grad()
def load_adapters(model: Transformer, state: dict, source: str):
    """Copy a LoRA checkpoint's tensors into the adapters, with one-line errors naming a tensor that does not fit."""
    expected = adapter_state(model)
    for name, tensor in state.items():
        if name not in expected:
            raise ModelError(f"{source}: unexpected adapter tensor {name}")
        if tensor.shape != expected[name].shape:
            raise ModelError(f"{source}: adapter {name} has shape {tuple(tensor.shape)} but this base and LoRA "
                             f"settings expect {tuple(expected[name].shape)}")
    missing = [n for n in expected if n not in state]
    if missing:
        raise ModelError(f"{source}: missing adapter tensor {missing[0]}")
    for name, tensor in state.items():
        expected[name].copy_(tensor)


def merged_model(ckpt: dict, path: str, base: str = "") -> Transformer:
    """The model of a checkpoint (read_checkpoint's dict, read from path): a LoRA checkpoint's base with its
    adapters merged in, any other as model.model_from_checkpoint builds it. `base` overrides the recorded base."""
    return merge_lora(with_adapters(ckpt, path, base)) if "lora" in ckpt else model_from_checkpoint(ckpt, path)


def load_merged(path: str, device="cpu", base: str = "") -> "tuple[Transformer, dict]":
    """(model, checkpoint) of a checkpoint of whole weights or of LoRA adapters (merged into their base); int8
    weights are refused (they are for inference only: inference.load_checkpoint reads every kind)."""
    ckpt = read_checkpoint(path)
    return merged_model(ckpt, path, base).to(device), ckpt
