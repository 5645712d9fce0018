"""
Pretraining, and the one training loop every training stage calls.

  python train.py                               # a small model in a few minutes on a laptop CPU
  python train.py --preset 12gb                 # the largest model that fits a 12 GB GPU
  python train.py --resume true                 # continue exactly where out/pretrain/last.pt stopped
  torchrun --nproc_per_node 2 train.py ...      # several GPUs (or CPU processes) with DDP

train() is the loop: train_sft.py, distill.py and train_dpo.py load their model, build their data, choose a
loss and call it. Device and precision follow runtime.py's rule. Checkpoints (out_dir/last.pt and best.pt)
are written atomically and never with diverged weights; Ctrl-C saves last.pt before exiting, and --resume
continues from it exactly.
"""
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cli import UserError, parse_config
from dataset import TokenShards
from evaluate import chat_report, describe_chat, loss_by_position, validation_loss
from lora import (BASE_QUANTS, TARGETS, adapter_state, add_lora, base_entries, cast_frozen, is_lora, load_merged,
                  lora_params, with_adapters)
from model import (ModelConfig, Transformer, extend_context, load_state_dict_checked, nonfinite_tensor,
                   read_checkpoint, save_checkpoint)
from runtime import (FUSED_ADAMW, LogWindow, Prefetcher, Runtime, capture_rng, check_memory, compiled_or_eager,
                     ctrl_c_as_flag, estimate_memory, peak_flops, restore_rng, run_main, warn_fallback)


@dataclass
class TrainConfig:
    """The loop's settings, with pretraining's values. Every stage restates the first block with its own
    values, so a change here changes pretraining only; the rest is plumbing that every stage shares."""
    out_dir: str = "out/pretrain"
    batch_size: int = 8            # sequences per micro-batch per process
    grad_accum: int = 1            # micro-batches per optimizer step
    max_steps: int = 800           # the cpu quickstart's: ~2.5 of its minutes, 1.6M tokens
    lr: float = 2e-3               # the best of a search for the cpu shape (AdamW)
    min_lr: float = 2e-4           # the cosine schedule ends here
    warmup_steps: int = 50
    weight_decay: float = 0.1      # applied to 2-D weights only (not norms)
    grad_clip: float = 1.0         # 0 disables clipping
    eval_every: int = 200          # also when last.pt / best.pt are written
    eval_batches: int = 10
    log_every: int = 10
    # shared by every stage
    optimizer: str = "adamw"       # adamw | muon: Muon for the 2-D weights inside the blocks, AdamW for the rest
    muon_lr: float = 0.0           # Muon's peak lr (same schedule); 0 = --lr: its updates are sized like AdamW's
    muon_momentum: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    device: str = "auto"           # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"            # auto | float32 | bfloat16 | float16
    compile: bool = False          # torch.compile the model
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    peak_tflops: float = 0.0       # for MFU; 0 = look up the GPU / measure the CPU
    memory_cap_gib: float = 0.0    # CUDA: use at most this much GPU memory (a big GPU acting as a 12 GB card); 0 = all
    seed: int = 0
    resume: bool = False           # continue from out_dir/last.pt
    stop_at_step: int = 0          # save and stop early (e.g. to split a run across sessions); 0 = never
    # context extension: from --init_from, train at a --seq_len beyond the model's with its RoPE scaled by
    # yarn, linear or dynamic (none: unscaled, the baseline); factor 0 = --seq_len / the trained length
    rope_scaling: str = ""
    rope_factor: float = 0.0


@dataclass
class FinetuneConfig(TrainConfig):
    """What the fine-tuning stages (train_sft.py, distill.py, train_dpo.py) add to the loop's settings: the
    checkpoint they start from, chat data, and LoRA. Each stage restates the values it tunes."""
    init_from: str = ""
    train_data: str = ""
    val_data: str = ""
    tokenizer: str = ""            # empty: the one init_from (or the resumed run) names, else data/tokenizer.model
    seq_len: int = 0               # longest row in tokens; 0 = the model's max_seq_len
    pack: bool = False             # several conversations per row of seq_len, each attending only to itself
    shard_dir: str = ""            # where chat files are tokenized to (once); empty: beside each file
    num_workers: int = 0           # processes that tokenize a chat file into shards; 0 = one per core
    lora_rank: int = 0             # > 0: train LoRA adapters of this rank on the frozen model; 0: every weight
    lora_alpha: float = 32.0       # the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = ",".join(TARGETS)  # projections to adapt (transformers: q k v o_proj, gate down up_proj;
    # add "experts" to adapt a mixture of experts' routed experts too)
    base_quant: str = ""           # nf4: QLoRA, the frozen base's projections held in 4 bits (needs --lora_rank
    # and torchao); empty: the base in the compute dtype
    # after training: what the stage kept and forgot (report_held_out)
    text_val: str = "data/pretrain_val.bin"  # pretraining's held-out text, its loss; empty: not measured
    chat_val: str = ""             # held-out chats: the chat report (records that say how to score them) and the loss
    eval_chats: int = 60           # held-out chats the chat report asks; 0 = no chat report
    eval_max_new_tokens: int = 160

    def lora(self):
        """The LoRA settings for resume_or_init, or None for full fine-tuning."""
        if self.base_quant not in BASE_QUANTS:
            raise UserError(f"--base_quant {self.base_quant!r}: use nf4, or leave it empty")
        if not self.lora_rank:
            if self.base_quant:
                raise UserError(f"--base_quant {self.base_quant} quantizes the frozen base of a LoRA run: "
                                f"add --lora_rank (e.g. 16)")
            return None
        return {"rank": self.lora_rank, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "targets": [t.strip() for t in self.lora_targets.split(",") if t.strip()],
                "base_quant": self.base_quant}


@dataclass
class PretrainConfig(TrainConfig):
    init_from: str = ""            # continue from this checkpoint (its shape; the flags below are ignored)
    train_data: str = "data/pretrain_train_*.bin"
    val_data: str = "data/pretrain_val.bin"
    tokenizer: str = "data/tokenizer.model"
    seq_len: int = 256
    # 1.3M parameters: in the quickstart's minutes a 4M model (dim 256) saw 0.3M tokens and never learned to
    # copy a word from the question ("What do rabbits eat? A frog eats ..."); this one sees 1.6M and does
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = field(default=None, metadata={"help": "SwiGLU width; unset: 8/3 * dim"})
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True
    # mixture of experts (model.py's MoE): n_experts > 0 replaces each feed-forward after first_dense_layers by
    # n_experts SwiGLUs of moe_hidden_dim (unset: hidden_dim), n_experts_per_tok of them run for each token
    n_experts: int = 0
    n_experts_per_tok: int = 2
    n_shared_experts: int = 0
    moe_hidden_dim: int = field(default=None, metadata={"help": "each expert's SwiGLU width; unset: hidden_dim"})
    norm_topk_prob: bool = True    # a token's k weights renormalised to sum to 1; false with 1 expert a token
    first_dense_layers: int = 0
    router_aux_loss_coef: float = 0.01  # the load-balancing loss's weight in the loss
    router_z_loss_coef: float = 0.001   # the router z-loss's weight


PRESETS = {
    "cpu": {},  # the defaults above
    # 8 x 1024 x 8 = 65,536 tokens a step; micro-batches of 8 leave room on a 12 GB card that drives a desktop
    "12gb": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, seq_len=1024, batch_size=8, grad_accum=8,
                 max_steps=20000, lr=6e-4, min_lr=6e-5, warmup_steps=500, eval_every=500, eval_batches=50,
                 log_every=20, compile=True),
    # the cpu model with 8 experts of half its SwiGLU width in each layer, 2 a token: the same active weights
    # (attention, 2 x 192 = 384 SwiGLU units), 3.1M in all against 1.3M
    "cpu_moe": dict(n_experts=8, n_experts_per_tok=2, moe_hidden_dim=192),
    # the 12gb model likewise: 8 experts of 1024, 2 a token, as active as the dense 2048; 255M in all against 85M,
    # in micro-batches of 4 (the same 65,536 tokens a step) to stay under the dense preset's 7 GiB
    "12gb_moe": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, seq_len=1024, batch_size=4, grad_accum=16,
                     max_steps=20000, lr=6e-4, min_lr=6e-5, warmup_steps=500, eval_every=500, eval_batches=50,
                     log_every=20, compile=True, n_experts=8, n_experts_per_tok=2, moe_hidden_dim=1024),
}


# -----------------------------------------------------------------------------
# the model to train

def resume_or_init(cfg: TrainConfig, model_cfg: ModelConfig = None, init_from: str = "", lora: dict = None):
    """The model to train and, with --resume, the checkpoint to continue from. A fresh run starts from `init_from`
    (fine-tuning) or new weights of `model_cfg` (pretraining); `lora` trains adapters on the frozen init_from."""
    last = os.path.join(cfg.out_dir, "last.pt")
    if cfg.resume:
        start = read_checkpoint(last)
        model_cfg = model_cfg or ModelConfig.from_dict(start["config"])
        check_resumable(start, model_cfg, cfg, lora, last)
        if lora:
            model = with_adapters(start, last)
        else:
            model = Transformer(model_cfg)
            load_state_dict_checked(model, start["model"], last)
        return model, start
    if os.path.exists(last):
        raise UserError(f"{last} exists: pass --resume true to continue it, or choose another --out_dir")
    torch.manual_seed(cfg.seed)  # the same initial weights (or adapters) for the same seed
    if init_from:
        model, ckpt = load_merged(init_from, keep_nf4=bool(lora and lora["base_quant"]))  # an NF4 base stays 4-bit
        if cfg.rope_scaling and "nf4" in ckpt and lora and lora["base_quant"]:  # (its rebuild copies float weights)
            raise UserError(f"--rope_scaling cannot extend the context of the 4-bit base {init_from}: start from its "
                            f"float import (convert_hf.py --from_hf without --base_quant), which --base_quant nf4 "
                            f"quantizes as it loads")
        if cfg.rope_scaling:  # the context extended to --seq_len (model.extend_context)
            if cfg.seq_len <= model.cfg.max_seq_len:
                raise UserError(f"--rope_scaling {cfg.rope_scaling} extends the context to --seq_len, which must be "
                                f"above the {model.cfg.max_seq_len} tokens the model was trained at "
                                f"(got {cfg.seq_len})")
            trained = model.cfg.max_seq_len
            model = extend_context(model, cfg.seq_len, cfg.rope_scaling, cfg.rope_factor)
            if int(os.environ.get("RANK", 0)) == 0:
                print(f"context: {trained} -> {cfg.seq_len} tokens, RoPE scaling {model.cfg.rope_scaling}")
        if lora:  # the tokens convert_hf.py added to an imported tokenizer are trained too
            add_lora(model, **lora, new_token_ids=ckpt.get("added_token_ids", []))
            model.lora = base_entries(model, init_from)
        return model, None
    return Transformer(model_cfg), None


def check_resumable(ckpt: dict, model_cfg: ModelConfig, cfg: TrainConfig, lora: dict, path: str):
    """Refuse to resume into a different model, data order, optimizer or LoRA shape: one line naming the field."""
    train_config = ckpt.get("train_config", {})
    for name, value in asdict(model_cfg).items():
        if ckpt["config"].get(name) != value:
            raise UserError(f"{path} was trained with {name}={ckpt['config'].get(name)!r} but this run "
                            f"has {name}={value!r}; use the same settings or a new --out_dir")
    for name in ("batch_size", "grad_accum", "seed"):
        if train_config.get(name) != getattr(cfg, name):
            raise UserError(f"{path} was trained with {name}={train_config.get(name)!r} but this run has "
                            f"{name}={getattr(cfg, name)!r}; the data order would change")
    old = train_config.get("optimizer", "adamw")
    if old != cfg.optimizer:
        raise UserError(f"{path} was trained with optimizer={old!r} but this run has optimizer={cfg.optimizer!r}; "
                        f"its optimizer state cannot carry over: use --optimizer {old} or a new --out_dir")
    saved = {**{k: ckpt["lora"][k] for k in ("rank", "alpha", "dropout", "targets")},
             "base_quant": ckpt["lora"].get("base_quant", "")} if ckpt.get("lora") else None
    wanted = {**lora, "targets": list(lora["targets"])} if lora else None
    if saved != wanted:
        def describe(s):
            return "LoRA " + ", ".join(f"{k}={v}" for k, v in s.items()) if s else "every weight (no LoRA)"
        raise UserError(f"{path} trained {describe(saved)} but this run asks for {describe(wanted)}; "
                        f"use the same --lora_* settings or a new --out_dir")


def place_model(model: Transformer, rt: Runtime) -> Transformer:
    """The model on the run's device, its frozen matrices (a LoRA base, a teacher) first cast to the compute dtype."""
    if rt.dtype != torch.float32:
        cast_frozen(model, rt.dtype)
    return model.to(rt.device)


def frozen_copy(path: str, rt: Runtime) -> Transformer:
    """A checkpoint's model that is never trained (a teacher, a reference), in eval mode, on the run's device."""
    return place_model(load_merged(path)[0].eval().requires_grad_(False), rt)


# -----------------------------------------------------------------------------
# the data

USEFUL_EPOCHS = 4  # past about 4 passes, repeated tokens are worth little (Muennighoff et al. 2023)


def report_epochs(cfg: TrainConfig, data, rt: Runtime):
    """Before the first step: the tokens this run will read against the tokens the data holds."""
    if getattr(data, "on_policy", False):  # its rows are sampled (train_grpo.py says how many problems it answers)
        return
    rows_per_step = cfg.grad_accum * cfg.batch_size * rt.world_size
    reads = cfg.max_steps * rows_per_step * data.tokens_per_row
    epochs = reads / data.num_tokens
    rt.say(f"this run reads {reads / 1e6:,.1f}M tokens ({cfg.max_steps:,} steps x {rows_per_step:,} rows); "
           f"the data holds {data.num_tokens / 1e6:,.1f}M: {epochs:,.2f} epochs")
    if epochs > USEFUL_EPOCHS:
        rt.say(f"warning: {epochs:.0f} passes over the same data; past about {USEFUL_EPOCHS} more repetition "
               f"is worth little: fetch more data (download_mini_data.py) or lower --max_steps to about "
               f"{int(cfg.max_steps * USEFUL_EPOCHS / epochs):,}", sys.stderr)


# -----------------------------------------------------------------------------
# the loss, the optimizers and their schedule

def default_loss(model, batch: dict):
    return model(**batch)[1]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def muon_weights(model: Transformer) -> list:
    """The weights Muon trains: the 2-D matrices inside the blocks (attention and MLP projections). The
    embedding and the output head (tied or not) are lookups and a classifier, not hidden transforms."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and name.startswith("layers.") and p.dim() == 2]


def make_optimizers(model: Transformer, cfg: TrainConfig, rt: Runtime) -> list:
    """[AdamW] for every weight, or with --optimizer muon [AdamW, Muon]: Muon for muon_weights(), AdamW for
    the rest. Weight decay only on 2-D weights."""
    if cfg.optimizer not in ("adamw", "muon"):
        raise UserError(f"--optimizer {cfg.optimizer!r}: use adamw or muon")
    if cfg.optimizer == "muon" and is_lora(model):
        raise UserError("--optimizer muon orthogonalises whole weight matrices, not LoRA's low-rank factors: "
                        "use --optimizer adamw with --lora_rank")
    if cfg.optimizer == "muon" and rt.scaler.is_enabled():
        raise UserError("--optimizer muon is not supported with fp16 loss scaling (an overflow could skip AdamW's "
                        "step but not Muon's): use --dtype bfloat16 or float32, or --optimizer adamw")
    to_muon = muon_weights(model) if cfg.optimizer == "muon" else []
    muon_ids = {id(p) for p in to_muon}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in muon_ids]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    fused = FUSED_ADAMW[rt.device.type]
    try:
        optimizers = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)]
    except RuntimeError as e:  # a device or dtype the fused kernel does not support
        if not fused:
            raise
        warn_fallback("fused AdamW", e)
        optimizers = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))]
    if to_muon:
        # match_rms_adamw scales each matrix's orthogonalised update to the size of an AdamW update
        # (Moonlight, Liu et al. 2025), so that AdamW's learning rate and weight decay carry over.
        optimizers.append(torch.optim.Muon(to_muon, lr=cfg.muon_lr or cfg.lr, weight_decay=cfg.weight_decay,
                                           momentum=cfg.muon_momentum, adjust_lr_fn="match_rms_adamw"))
    return optimizers


def set_lr(optimizers: list, lr: float, cfg: TrainConfig):
    """This step's learning rate; Muon follows the same schedule from its own peak."""
    for optimizer in optimizers:
        scale = (cfg.muon_lr or cfg.lr) / cfg.lr if isinstance(optimizer, torch.optim.Muon) else 1.0
        for group in optimizer.param_groups:
            group["lr"] = lr * scale


# -----------------------------------------------------------------------------
# logging and checkpoints

def log_metrics(path: str, record: dict, rt: Runtime):
    if rt.master:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def expert_report(model: Transformer) -> dict:
    """A mixture of experts' routing since the last log (then cleared): each expert's share of its layer's tokens,
    their coefficient of variation averaged over the layers (0: even), the routers' weighted balancing and z-loss
    of the last micro-batch, and how many of the routed (token, expert) choices did not run (0: dropless)."""
    load = model.expert_load  # (MoE layers, n_experts)
    share = load / load.sum(-1, keepdim=True).clamp(min=1)
    cv = (share.std(-1, correction=0) / share.mean(-1)).mean()
    dropped = model.routed_tokens * model.cfg.n_experts_per_tok * len(model.moe) - load.sum()
    router_loss = sum(m.aux_loss.detach() for m in model.moe) / len(model.moe)
    record = {"router_loss": router_loss.item(), "expert_load_cv": cv.item(), "dropped": int(dropped.item()),
              "expert_load": [[round(x, 4) for x in row] for row in share.tolist()]}
    load.zero_()
    model.routed_tokens.zero_()
    return record


def stop_if_diverged(model: Transformer, window_loss: float, step: int, last_path: str):
    """Every rank, before every save and at log steps: the losses since the last check, and the weights
    themselves that train (a step can make them non-finite while its own loss was finite; frozen ones cannot be)."""
    bad = nonfinite_tensor({name: p for name, p in model.named_parameters() if p.requires_grad})
    if not math.isfinite(window_loss) or bad:
        what = f"loss is {window_loss}" if not math.isfinite(window_loss) else f"{bad} is not finite"
        raise FloatingPointError(f"{what} at step {step}; stopping with the last good checkpoint intact "
                                 f"({last_path}). Try a lower --lr.")


def save_checkpoints(paths: list, model: Transformer, optimizers: list, rt: Runtime, cfg: TrainConfig, tokenizer: str,
                     step: int, val_loss, best_val: float):
    """This step's checkpoint, made once, written to each path by rank 0. No data position: batch i is a pure function
    of the seed and i, so the step gives it. A LoRA run stores its adapters and which base they belong to."""
    if not rt.master:
        return
    weights = {"model": adapter_state(model), "lora": model.lora} if is_lora(model) else {"model": model.state_dict()}
    ckpt = {**weights, "config": asdict(model.cfg), "step": step,
            "optimizer": [o.state_dict() for o in optimizers], "scaler": rt.scaler.state_dict(),
            "rng": capture_rng(), "train_config": asdict(cfg), "tokenizer": tokenizer,
            "val_loss": val_loss, "best_val_loss": best_val}
    for path in paths:
        save_checkpoint(ckpt, path)


# -----------------------------------------------------------------------------
# the loop

def prepare(cfg: TrainConfig, model: Transformer, train_data, loss_fn, start: dict, rt: Runtime) -> tuple:
    """Before the first step: the memory estimate, the epochs, the model on its device, its optimizers (a resumed
    run's state restored) and the model the steps run (compiled, DDP-wrapped). Returns (optimizers, step model)."""
    adapters = lora_params(model.cfg, model.lora["rank"], model.lora["targets"]) if is_lora(model) else 0
    rows = getattr(train_data, "rows_per_batch", cfg.batch_size)  # PreferenceData: two rows a pair
    check_memory(estimate_memory(model.cfg, rows, train_data.seq_len, rt.dtype, cfg.grad_checkpointing, cfg.optimizer,
                                 adapters, model.lora.get("base_quant", "") if adapters else ""),
                 rt, cfg.memory_cap_gib, cfg.grad_checkpointing)
    report_epochs(cfg, train_data, rt)
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed + rt.rank)
    place_model(model, rt)
    model.grad_checkpointing = cfg.grad_checkpointing
    optimizers = make_optimizers(model, cfg, rt)
    if start:
        states = start["optimizer"] if isinstance(start["optimizer"], list) else [start["optimizer"]]  # older runs
        for optimizer, state in zip(optimizers, states, strict=True):
            optimizer.load_state_dict(state)
        rt.scaler.load_state_dict(start["scaler"])
        restore_rng(start["rng"])
    step_model = compiled_or_eager(model, rt.to_device(train_data.batch(0)), loss_fn, rt) if cfg.compile else model
    if rt.ddp:
        step_model = DistributedDataParallel(step_model,
                                             device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return optimizers, step_model


def train(cfg: TrainConfig, model: Transformer, train_data, val_data=None, rt: Runtime = None,
          loss_fn=default_loss, tokenizer: str = "", start: dict = None) -> dict:
    """The training loop: cfg.max_steps optimizer steps of loss_fn(model, batch) over train_data.batch(i), continuing
    `start` (a checkpoint) when resuming; the data also tells batch_size, seq_len (its longest row), num_tokens and
    tokens_per_row. Only rank 0 prints and writes. Returns {step, val_loss, best_val_loss, last_path}."""
    rt = rt or Runtime(cfg.device, cfg.dtype, cfg.memory_cap_gib)
    optimizers, step_model = prepare(cfg, model, train_data, loss_fn, start, rt)
    step, val_loss, best_val = (start or {}).get("step", 0), None, (start or {}).get("best_val_loss", math.inf)
    last_path, best_path, metrics = (os.path.join(cfg.out_dir, f) for f in ("last.pt", "best.pt", "metrics.jsonl"))
    validate = partial(validation_loss, step_model, val_data, cfg.eval_batches, rt, loss_fn) \
        if val_data is not None else None
    extended_from = getattr(model, "extended_from", 0)  # a context being extended: its loss by position
    by_position = (lambda: loss_by_position(step_model, val_data, cfg.eval_batches, extended_from, rt)) \
        if extended_from and val_data is not None else None
    peak, window = peak_flops(rt.device, cfg.peak_tflops) * rt.world_size, LogWindow(rt, model.flops_per_token)
    with tqdm(total=cfg.max_steps, initial=step, disable=not rt.master, dynamic_ncols=True, desc="train") as bar, \
            ctrl_c_as_flag() as ctrl_c, contextlib.closing(Prefetcher(train_data, step * cfg.grad_accum, rt)) \
            as prefetch:
        if step == 0 and validate:  # the starting point, to judge what training achieved
            log_metrics(metrics, {"step": 0, "val_loss": validate()}, rt)
        if step == 0 and by_position:
            rt.say(f"validation loss by position before: {by_position()}")
        while step < cfg.max_steps:
            # ---- one optimizer step: grad_accum micro-batches forward and backward, then clip and update
            window.start = window.start or time.perf_counter()  # evaluating and saving are not timed
            lr = lr_at(step, cfg)
            set_lr(optimizers, lr, cfg)
            for micro in range(cfg.grad_accum):
                batch = prefetch.next()
                sync = micro == cfg.grad_accum - 1 or not rt.ddp  # DDP all-reduces on the last micro-batch only
                with (contextlib.nullcontext() if sync else step_model.no_sync()), rt.autocast:
                    loss = loss_fn(step_model, batch) / cfg.grad_accum
                rt.scaler.scale(loss).backward()
                window.add(loss, batch["tokens"])
            if cfg.grad_clip:
                for optimizer in optimizers:
                    rt.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for optimizer in optimizers:  # with fp16, each skips the step if its gradients overflowed
                rt.scaler.step(optimizer)
            rt.scaler.update()
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            step, window.steps, last_step = step + 1, window.steps + 1, step + 1 == cfg.max_steps
            bar.update(1)
            # ---- log: loss, tokens/s and MFU of the steps since the last log line
            if step % cfg.log_every == 0 or last_step:
                record = window.summary(step, lr, peak)  # the only per-log host sync
                if not math.isfinite(record["loss"]):
                    stop_if_diverged(model, record["loss"], step, last_path)
                if model.moe:
                    record.update(expert_report(model))
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                mfu=f"{record['mfu']:.1%}", **({"load_cv": f"{record['expert_load_cv']:.2f}"}
                                                               if model.moe else {}))
                log_metrics(metrics, record, rt)
                window = LogWindow(rt, model.flops_per_token)
            # ---- evaluate, save (best.pt when the validation loss improved, then last.pt), stop
            evaluating = step % cfg.eval_every == 0 or last_step
            stopping = step == cfg.stop_at_step and not last_step
            # Ctrl-C: under DDP every rank must agree, which costs a collective: only at log steps
            interrupted = (not rt.ddp or step % cfg.log_every == 0) and rt.any_rank(ctrl_c.is_set())
            paths = [last_path] if evaluating or stopping or interrupted else []
            if evaluating and validate:
                val_loss = validate()
                rt.say(f"step {step}: val loss {val_loss:.4f}")
                log_metrics(metrics, {"step": step, "val_loss": val_loss}, rt)
                if val_loss < best_val:
                    best_val = val_loss
                    paths.insert(0, best_path)
            if paths:
                stop_if_diverged(model, window.mean_loss(), step, last_path)  # every rank: it may all-reduce
                save_checkpoints(paths, model, optimizers, rt, cfg, tokenizer, step, val_loss, best_val)
            if stopping:
                rt.say(f"stopped at step {step} as asked: saved {last_path}; continue with --resume true")
                break
            if interrupted:
                rt.say(f"interrupted at step {step}: saved {last_path}; continue with --resume true", sys.stderr)
                raise KeyboardInterrupt
        if by_position and step == cfg.max_steps:
            rt.say(f"validation loss by position after: {by_position()}")
    return {"step": step, "val_loss": val_loss, "best_val_loss": best_val, "last_path": last_path}


def report_held_out(cfg: FinetuneConfig, model: Transformer, rt: Runtime, tok, stage: str, held_out: dict) -> dict:
    """After a fine-tuning stage, what it kept and what it forgot: the validation loss on pretraining's held-out text
    (cfg.text_val, when it holds this tokenizer's ids) and on each of `held_out` (a name -> data with .batch(i):
    chats, reasoning, ...), every rank together; then rank 0's chat report on cfg.chat_val's held-out chats
    (evaluate.chat_report), so no rank waits in a collective while it generates. Returns the chat report, or {}."""
    data, missing = {name: d for name, d in held_out.items() if d is not None}, ""
    if cfg.text_val and not os.path.exists(cfg.text_val):
        missing = f" ({cfg.text_val} is not there: not measured)"
    elif cfg.text_val:
        text = TokenShards(cfg.text_val, cfg.seq_len or model.cfg.max_seq_len, cfg.batch_size, cfg.seed, rt.rank,
                           rt.world_size)
        if text.made_with(cfg.tokenizer):
            data = {"pretraining text": text, **data}
        else:  # another tokenizer's ids: their loss would mean nothing (or index past the vocabulary)
            missing = f" ({cfg.text_val} was made with another tokenizer than {cfg.tokenizer}: not measured)"
    losses = [f"{name} {validation_loss(model, d, cfg.eval_batches, rt, default_loss):.3f}" for name, d in data.items()]
    rt.say(f"validation loss after {stage}: {', '.join(losses) or 'none'}{missing}")
    report = {}
    if cfg.eval_chats and cfg.chat_val and rt.master:
        if os.path.exists(cfg.chat_val):
            report = chat_report(model, tok, cfg.chat_val, cfg.eval_chats, cfg.eval_max_new_tokens)
            print(f"chat report after {stage}: {describe_chat(report)}")
        else:
            print(f"no chat report after {stage}: {cfg.chat_val} is not there (--chat_val)")
    return report


# -----------------------------------------------------------------------------
# pretraining

def pretrain(cfg: PretrainConfig) -> dict:
    rt = Runtime(cfg.device, cfg.dtype, cfg.memory_cap_gib)
    # ---- data: random windows of the token shards
    train_data = TokenShards(cfg.train_data, cfg.seq_len, cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
    val_data = TokenShards(cfg.val_data, cfg.seq_len, cfg.batch_size, cfg.seed, rt.rank, rt.world_size) \
        if cfg.val_data else None
    # ---- model: new weights of this shape, or --init_from's, or --resume's
    model_cfg = ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                            vocab_size=train_data.vocab_size, hidden_dim=cfg.hidden_dim, rope_theta=cfg.rope_theta,
                            max_seq_len=cfg.seq_len, tie_embeddings=cfg.tie_embeddings, dropout=cfg.dropout,
                            n_experts=cfg.n_experts, n_experts_per_tok=cfg.n_experts_per_tok,
                            n_shared_experts=cfg.n_shared_experts, moe_hidden_dim=cfg.moe_hidden_dim,
                            norm_topk_prob=cfg.norm_topk_prob,
                            first_dense_layers=cfg.first_dense_layers, router_aux_loss_coef=cfg.router_aux_loss_coef,
                            router_z_loss_coef=cfg.router_z_loss_coef)
    model, start = resume_or_init(cfg, None if cfg.init_from else model_cfg, init_from=cfg.init_from)
    if train_data.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{cfg.train_data} was tokenized with {train_data.vocab_size} pieces but the model's "
                        f"vocab_size is {model.cfg.vocab_size}")
    if rt.master:
        active = f" ({model.num_params(active=True) / 1e6:.2f}M active a token)" if model.moe else ""
        print(f"model: {model.num_params() / 1e6:.2f}M parameters{active}, {rt.device} {str(rt.dtype).removeprefix('torch.')}, "
              f"{train_data.num_tokens:,} training tokens")
    # ---- train: next-token prediction on every position
    return train(cfg, model, train_data, val_data, rt, tokenizer=cfg.tokenizer, start=start)


if __name__ == "__main__":
    run_main(pretrain, parse_config(PretrainConfig, presets=PRESETS, description=__doc__.strip().splitlines()[0]))
