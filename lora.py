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

QLoRA (Dettmers et al. 2023): with base_quant="nf4" the frozen projections are held in 4-bit NormalFloat (a
code of 16 values spaced as a normal distribution's quantiles, one absmax scale per block of 64 weights, the
scales themselves quantized to 8 bits: about 4.1 bits a weight, against 16 in bf16) and dequantized one layer at
a time, in the input's dtype, inside the forward. The format is torchao's NF4 tensor (a maintained library that
runs on the CPU as well as CUDA), imported only then. The embedding, head and norms stay in the compute dtype.

Imports torch and model.py only (and torchao for an NF4 base): the two files can be copied into another project
together.
"""
import contextlib
import functools
import hashlib
import logging
import math
import os
import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import (Linear, MoE, ModelConfig, ModelError, Transformer, empty_model, model_from_checkpoint,
                   read_checkpoint)

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


NF4_BLOCK = 64  # weights per absmax scale (QLoRA's block); the scales are quantized in groups of up to 256
BASE_QUANTS = ("", "nf4")


@functools.cache
def nf4_library():
    """torchao's NF4 module (to_nf4, NF4Tensor and its metadata), imported once, on first use: plain LoRA needs only
    torch."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:  # its import warns that its CUDA kernels do not load on a CPU: NF4 needs none of them
        log.setLevel(logging.ERROR)
    # torch.compile asks tensor subclasses for a hash its cache could use; without one it only recompiles
    warnings.filterwarnings("ignore", message="NF4Tensor does not implement _stable_hash_for_caching")
    try:
        from torchao.quantization import NF4Tensor
    except ImportError:
        raise ModelError("a 4-bit NF4 base (base_quant nf4) needs torchao: pip install torchao") from None
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return sys.modules[NF4Tensor.__module__]


def to_nf4(weight: torch.Tensor):
    """torchao's NF4 tensor of a 2-D weight, quantized from fp32 (the same codes on every device)."""
    blocks = weight.numel() // NF4_BLOCK
    if weight.numel() % NF4_BLOCK:
        raise ModelError(f"an NF4 base needs every projection to hold a multiple of {NF4_BLOCK} weights, "
                         f"but one has shape {tuple(weight.shape)}")
    return nf4_library().to_nf4(weight.detach().float().contiguous(), NF4_BLOCK, math.gcd(blocks, 256))


class NF4Linear(nn.Module):
    """A frozen bias-free projection held in 4 bits (QLoRA's base), from an NF4 tensor (to_nf4). Each forward
    dequantizes the weight to the input's dtype for that product only; backward does the same for the input's
    gradient (the weight has none)."""

    def __init__(self, weight):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight)  # torchao's NF4 linear: (..., in) -> (..., out)

    def dequantized(self) -> Linear:
        """A plain fp32 projection holding the dequantized weight (what merging and exporting start from)."""
        linear = Linear(self.in_features, self.out_features, device=self.weight.device)
        linear.weight.data = self.weight.get_original_weight().float()
        return linear


def base_projections(model: Transformer):
    """(parent module, attribute name) of every projection of the blocks (attention, feed-forward, experts): what
    an NF4 base holds in 4 bits."""
    for block in model.layers:
        for parent in adapted_parents(block, [EXPERTS]):
            yield from ((parent, name) for name in TARGETS if hasattr(parent, name))


def quantize_base(model: Transformer):
    """Hold every projection of the blocks in NF4, in place; a LoRA-wrapped one keeps its adapters. One at a time,
    so the float weights are let go of as it goes."""
    for parent, name in base_projections(model):
        module = getattr(parent, name)
        if isinstance(module, LoRALinear) and not isinstance(module.base, NF4Linear):
            module.base = NF4Linear(to_nf4(module.base.weight))
        elif isinstance(module, nn.Linear):
            setattr(parent, name, NF4Linear(to_nf4(module.weight)))


NF4_PARTS = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


def nf4_checkpoint_state(model: Transformer) -> "tuple[dict, dict]":
    """(the float tensors of the state, the NF4 weights as plain tensors: name -> its parts and scale group), what
    an NF4 base checkpoint stores ("model" and "nf4"): plain tensors load with weights_only and without torchao."""
    state, nf4 = {}, {}
    for name, tensor in model.state_dict().items():
        if type(tensor).__name__ == "NF4Tensor":
            nf4[name] = {**{part: getattr(tensor, part) for part in NF4_PARTS},
                         "scaler_block_size": tensor.scaler_block_size}
        else:
            state[name] = tensor
    return state, nf4


def nf4_tensor(parts: dict, shape) -> torch.Tensor:
    """The NF4 tensor of stored parts (nf4_checkpoint_state), rebuilt through the tensor-subclass protocol."""
    library, shape = nf4_library(), torch.Size(shape)
    meta = {"block_size": NF4_BLOCK, "n_blocks": shape.numel() // NF4_BLOCK,
            "scaler_block_size": parts["scaler_block_size"],
            "tensor_meta": library.SubclassTensorArgs(shape, (shape[1], 1), 0, parts["quantization_factor"].dtype,
                                                      parts["quantized_data"].device, False)}
    return library.NF4Tensor.__tensor_unflatten__({p: parts[p] for p in NF4_PARTS}, meta, shape, (shape[1], 1))


def nf4_model(ckpt: dict, path: str) -> Transformer:
    """The model of an NF4 base checkpoint (convert_hf.py --from_hf --base_quant nf4): its projections in 4 bits,
    never whole in float, the embedding, head and norms as stored."""
    model = empty_model(ModelConfig.from_dict(ckpt["config"]))
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for name, parts in ckpt["nf4"].items():
        parent, attr = name.removesuffix(".weight").rsplit(".", 1)
        if name not in shapes:
            raise ModelError(f"{path}: unexpected NF4 tensor {name}")
        setattr(model.get_submodule(parent), attr, NF4Linear(nf4_tensor(parts, shapes[name])))
    model.load_state_dict(ckpt["model"], strict=False, assign=True)
    if model.cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    missing = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if missing:
        raise ModelError(f"{path}: missing tensor {missing}")
    return model.requires_grad_(False)


def quantized_weights(model: nn.Module) -> set:
    """The ids of the NF4 weights of a model (what casting to the compute dtype must leave alone)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, NF4Linear)}


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
        """The base layer with the update folded into its weight (computed in fp32); an NF4 base dequantized."""
        if isinstance(self.base, NF4Linear):
            self.base = self.base.dequantized()
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
             new_token_ids=(), base_quant: str = "") -> Transformer:
    """Freeze every weight of `model` and wrap the `targets` projections of every block (in place). The rows
    of new_token_ids (tokens without a trained embedding yet) are trained too. base_quant "nf4": every
    projection of the base held in 4 bits (QLoRA)."""
    unknown = sorted(set(targets) - set(TARGETS) - {EXPERTS})
    if base_quant not in BASE_QUANTS:
        raise ModelError(f"unknown base quantization {base_quant!r}: nf4, or empty for the compute dtype")
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
    if base_quant:
        quantize_base(model)
    model.lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(targets),
                  "new_token_ids": [int(i) for i in new_token_ids]}
    if base_quant:
        model.lora["base_quant"] = base_quant
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
    weights that never change. Norms (vectors), the trainable adapters and an NF4 base's codes stay as they are."""
    quantized = quantized_weights(model)
    for p in model.parameters():
        if not p.requires_grad and p.dim() == 2 and id(p) not in quantized:
            p.data = p.data.to(dtype)


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold the adapters into the weights (in place): a plain Transformer again, with the state_dict names and
    fp32 weights it had before add_lora, every weight trainable. An NF4 base is dequantized first (the weights
    the adapters were trained against); a model with an NF4 base and no adapters is just dequantized."""
    for block in model.layers:
        for parent in adapted_parents(block, [EXPERTS]):
            for name, module in list(parent.named_children()):
                if isinstance(module, LoRALinear):
                    setattr(parent, name, module.merged())
                elif isinstance(module, NF4Linear):
                    setattr(parent, name, module.dequantized())
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
    model, _ = load_merged(base, keep_nf4=meta.get("base_quant") == "nf4")
    context = ("max_seq_len", "rope_scaling")  # a run may have extended the base's context (no weights change)
    for name, value in ckpt["config"].items():
        if name not in context and getattr(model.cfg, name) != value:
            raise ModelError(f"{path} holds LoRA adapters for a model with {name}={value!r}, but {base} has "
                             f"{name}={getattr(model.cfg, name)!r}")
    if any(getattr(model.cfg, name) != ckpt["config"][name] for name in context):
        longer = Transformer(ModelConfig.from_dict(ckpt["config"]))
        longer.load_state_dict(model.state_dict())
        model = longer
    add_lora(model, meta["rank"], meta["alpha"], meta["dropout"], meta["targets"], meta["new_token_ids"],
             meta.get("base_quant", ""))
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


def merged_model(ckpt: dict, path: str, base: str = "", keep_nf4: bool = False) -> Transformer:
    """The model of a checkpoint (read_checkpoint's dict, read from path): a LoRA checkpoint's base with its
    adapters merged in, an NF4 base dequantized (kept in 4 bits with keep_nf4, for a QLoRA run on it), any other
    as model.model_from_checkpoint builds it. `base` overrides the recorded base."""
    if "lora" in ckpt:
        return merge_lora(with_adapters(ckpt, path, base))
    if "nf4" in ckpt:
        return nf4_model(ckpt, path) if keep_nf4 else merge_lora(nf4_model(ckpt, path))
    return model_from_checkpoint(ckpt, path)


def load_merged(path: str, device="cpu", base: str = "", keep_nf4: bool = False) -> "tuple[Transformer, dict]":
    """(model, checkpoint) of a checkpoint of whole weights, of an NF4 base or of LoRA adapters (merged into their
    base); int8 weights are refused (they are for inference only: evaluate.load_checkpoint reads every kind)."""
    ckpt = read_checkpoint(path)
    return merged_model(ckpt, path, base, keep_nf4).to(device), ckpt
