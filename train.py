"""
Pretraining, and the one training loop that train_sft.py and distill.py reuse.

  python train.py --preset cpu                  # a small model in a few minutes on a laptop CPU
  python train.py --preset 12gb                 # the largest model that fits a 12 GB GPU
  python train.py --preset cpu --resume true    # continue exactly where out/pretrain/last.pt stopped
  torchrun --nproc_per_node 2 train.py ...      # several GPUs (or CPU processes) with DDP

Device and precision are picked automatically: bf16 autocast on CUDA cards that support it,
fp16 with a gradient scaler on older ones, fp32 on CPU. Checkpoints (out_dir/last.pt and
best.pt) are written atomically; Ctrl-C saves last.pt before exiting.
"""
import contextlib
import json
import math
import os
import queue
import signal
import sys
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cli import UserError, die, parse_config, run_guarded
from lora import (TARGETS, adapter_state, add_lora, base_entries, cast_frozen, is_lora, load_model, lora_params,
                  with_adapters)
from model import (ModelConfig, ModelError, Transformer, extend_context, load_state_dict_checked, nonfinite_tensor,
                   read_checkpoint, save_checkpoint)


@dataclass
class TrainConfig:
    """The loop's settings, with pretraining's values. train_sft.py and distill.py restate the first
    block with their own values, so a change here changes pretraining only; the rest is plumbing that
    every stage shares."""
    out_dir: str = "out/pretrain"
    batch_size: int = 8            # sequences per micro-batch per process
    grad_accum: int = 1            # micro-batches per optimizer step
    max_steps: int = 150           # the cpu quickstart: 1.3 of its 6 minutes; distillation needs more (see README)
    lr: float = 2e-3               # the best of 1e-3 ... 1.6e-2 for the cpu shape (AdamW; see the README)
    min_lr: float = 2e-4           # the cosine schedule ends here
    warmup_steps: int = 30
    weight_decay: float = 0.1      # applied to 2-D weights only (not norms)
    grad_clip: float = 1.0         # 0 disables clipping
    eval_every: int = 100          # also when last.pt / best.pt are written
    eval_batches: int = 10
    log_every: int = 10
    # shared by every stage
    optimizer: str = "adamw"       # adamw | muon: Muon for the 2-D weights inside the blocks, AdamW for the rest
    muon_lr: float = 0.0           # Muon's peak lr (same schedule); 0 = --lr: its updates are sized like AdamW's
    muon_momentum: float = 0.95
    beta1: float = 0.9
    beta2: float = 0.95
    device: str = "auto"           # auto | cpu | cuda | cuda:N
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
class PretrainConfig(TrainConfig):
    init_from: str = ""            # continue from this checkpoint (its shape; the flags below are ignored)
    train_data: str = "data/pretrain_train_*.bin"
    val_data: str = "data/pretrain_val.bin"
    tokenizer: str = "data/tokenizer.model"
    seq_len: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = field(default=None, metadata={"help": "SwiGLU width; unset: 8/3 * dim"})
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = True


PRESETS = {
    "cpu": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, seq_len=256, batch_size=8, max_steps=150, lr=2e-3,
                min_lr=2e-4),
    # 8 x 1024 x 8 = 65,536 tokens per step; a micro-batch of 8 leaves room on a 12 GB card that also
    # drives a desktop (5.9 GiB simulated with the 12gb tokenizer's 12,000 pieces; 16 rows: 10.3 GiB).
    "12gb": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, seq_len=1024, batch_size=8, grad_accum=8,
                 max_steps=20000, lr=6e-4, min_lr=6e-5, warmup_steps=500, eval_every=500, eval_batches=50,
                 log_every=20, compile=True),
}

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; "4070" must come after "4070 Ti" style names.
GPU_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "4090": 165, "4080": 97, "4070": 58,
                   "3090": 71, "3080": 59, "3070": 40, "3060": 25}


def cap_memory(device: torch.device, cap_gib: float):
    """Let the caching allocator use at most cap_gib of the card, so that a large GPU shows what a
    smaller one would: allocations beyond it raise out-of-memory as they would there."""
    if cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        if cap_gib * 2**30 > total:
            raise UserError(f"--memory_cap_gib {cap_gib} is more than the {total / 2**30:.1f} GiB of "
                            f"{torch.cuda.get_device_name(device)}")
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total, device)


class Runtime:
    """Where and how the run executes: device, precision, and the DDP rank if launched by torchrun."""

    def __init__(self, cfg: TrainConfig):
        self.ddp = "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and self.ddp:
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: CUDA is not available on this machine")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            cap_memory(self.device, cfg.memory_cap_gib)
        if self.ddp:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        dtype = cfg.dtype
        if dtype == "auto":
            # bf16 matmuls on CPUs without AVX-512 are ~100x slower than fp32: CPU stays fp32.
            dtype = "float32" if self.device.type == "cpu" else \
                "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        self.dtype = getattr(torch, dtype)
        self.autocast = contextlib.nullcontext() if self.dtype == torch.float32 else \
            torch.autocast(self.device.type, dtype=self.dtype)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.master = self.rank == 0

    def any_rank(self, flag: bool) -> bool:
        if not self.ddp:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def all_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.ddp:  # SUM then divide: gloo (CPU) has no ReduceOp.AVG
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value


def peak_flops(rt: Runtime, override_tflops: float = 0.0) -> float:
    """FLOP/s the hardware can do at best: a table for GPUs, a quick matmul measurement on CPU."""
    if override_tflops:
        return override_tflops * 1e12
    if rt.device.type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        return next((t * 1e12 for key, t in GPU_PEAK_TFLOPS.items() if key in name), float("nan"))
    # A private generator: drawing from the global one would change the dropout masks of a resumed run.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    a @ b  # warm-up
    best, reps = float("inf"), 10
    for _ in range(3):  # the fastest of three: a busy moment would otherwise inflate MFU
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 * reps / best


def estimate_memory(model_cfg: ModelConfig, batch_size: int, seq_len: int, dtype: torch.dtype,
                    grad_checkpointing: bool = False, optimizer: str = "adamw", lora_rank: int = 0,
                    lora_targets=TARGETS) -> dict:
    """Bytes the training step needs at its peak (the start of backward), by part. Activations
    are what autograd keeps per token: per layer the fp32 residual stream and normalised inputs,
    and in the compute dtype the matmul inputs and outputs (attention is a fused kernel: no
    T x T matrix is kept); then the fp32 log-probabilities and their gradients over the vocabulary.
    Within 0.99x of the measured peak of the cpu preset's loop, and 1.0-1.04x of bf16 steps of the
    12gb preset simulated on fake tensors (bench.py --memory_only; tests/test_pipeline.py). AdamW keeps
    two fp32 moments per weight; Muon one momentum buffer for the matrices it trains. With LoRA (lora_rank)
    the frozen weights are kept in the compute dtype, and only the fp32 adapters have gradients and
    optimizer state; the activations are the same (each adapter needs the input its base layer sees)."""
    with torch.device("meta"):
        n_params = Transformer(model_cfg).num_params()
    c, e = model_cfg, dtype.itemsize
    kv_dim = c.n_kv_heads * c.head_dim
    per_layer = 16 * c.dim + e * (4 * c.dim + 2 * kv_dim + 4 * c.hidden_dim) + 4 * c.n_heads
    head = 8 * c.dim + 12 * c.vocab_size  # final norm, log-probabilities and their gradients
    # Checkpointing keeps each block's input; in backward the head's peak comes first, then
    # one block at a time is recomputed.
    per_token = c.n_layers * 4 * c.dim + max(per_layer, head) if grad_checkpointing \
        else c.n_layers * per_layer + head
    # fp32 master weights, plus the low-precision copies autocast makes of them for the matmuls
    weights = 4 * n_params + (e * n_params if e < 4 else 0)
    activations = batch_size * seq_len * per_token
    if lora_rank:
        adapters = lora_params(model_cfg, lora_rank, lora_targets)
        return {"weights": e * n_params + 4 * adapters, "gradients": 4 * adapters, "optimizer": 8 * adapters,
                "activations": activations}
    block_matrices = c.n_layers * (2 * c.dim * c.dim + 2 * c.dim * kv_dim + 3 * c.dim * c.hidden_dim)
    optimizer_bytes = 8 * n_params - (4 * block_matrices if optimizer == "muon" else 0)
    return {"weights": weights, "gradients": 4 * n_params, "optimizer": optimizer_bytes, "activations": activations}


def check_memory(model: Transformer, cfg: TrainConfig, rows: int, seq_len: int, rt: Runtime):
    """Print the estimate for micro-batches of rows x seq_len tokens; on CUDA stop before the first step if
    it cannot fit."""
    lora = model.lora if is_lora(model) else {}
    parts = estimate_memory(model.cfg, rows, seq_len, rt.dtype, cfg.grad_checkpointing, cfg.optimizer,
                            lora.get("rank", 0), lora.get("targets", TARGETS))
    total = sum(parts.values())
    if rt.master:
        print("memory estimate: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items()) +
              f" = {total / 2**30:.2f} GiB")
    if rt.device.type == "cuda":
        free = torch.cuda.mem_get_info(rt.device)[0]
        if cfg.memory_cap_gib:
            free = min(free, cfg.memory_cap_gib * 2**30 - torch.cuda.memory_reserved(rt.device))
        if total > 0.95 * free:
            hint = "" if cfg.grad_checkpointing else ", or add --grad_checkpointing true"
            raise UserError(f"needs about {total / 2**30:.1f} GiB but {free / 2**30:.1f} GiB is free on "
                            f"{torch.cuda.get_device_name(rt.device)}: lower --batch_size (raise --grad_accum "
                            f"to keep the same tokens per step) or --seq_len{hint}")


# Past about four passes over the same tokens, more repetition is worth little (Muennighoff et al. 2023,
# "Scaling Data-Constrained Language Models").
USEFUL_EPOCHS = 4


def report_epochs(cfg: TrainConfig, data, rt: Runtime):
    """Before the first step: the tokens this run will read against the tokens the data holds."""
    rows_per_step = cfg.grad_accum * cfg.batch_size * rt.world_size
    reads = cfg.max_steps * rows_per_step * data.tokens_per_row
    epochs = reads / data.num_tokens
    if rt.master:
        print(f"this run reads {reads / 1e6:,.1f}M tokens ({cfg.max_steps:,} steps x {rows_per_step:,} rows); "
              f"the data holds {data.num_tokens / 1e6:,.1f}M: {epochs:,.2f} epochs")
        if epochs > USEFUL_EPOCHS:
            print(f"warning: {epochs:.0f} passes over the same data; past about {USEFUL_EPOCHS} more repetition "
                  f"is worth little: fetch more data (download_mini_data.py) or lower --max_steps to about "
                  f"{int(cfg.max_steps * USEFUL_EPOCHS / epochs):,}", file=sys.stderr)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def muon_weights(model: Transformer) -> list:
    """The weights Muon trains: the 2-D matrices inside the blocks (attention and MLP projections). The
    embedding and the output head (tied or not) are lookups and a classifier, not hidden transforms."""
    return [p for name, p in model.named_parameters() if p.requires_grad and name.startswith("layers.") and p.dim() == 2]


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
    fused = rt.device.type == "cuda"
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


def warn_fallback(fast_path: str, error: Exception):
    """One line for an optional fast path that does not work on this machine; the run goes on without it."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
    print(f"warning: {fast_path} does not work here ({type(error).__name__}: {detail}); "
          f"continuing without it", file=sys.stderr)


def compiled_or_eager(model: Transformer, batch: tuple, loss_fn, rt: Runtime):
    """torch.compile(model) where it works. The graph is built here, on one forward and backward of
    a real training batch (gradients and RNG restored afterwards, so the run is unchanged), so that a
    missing backend (no Triton on Windows, no C++ compiler, an unsupported GPU) costs one warning
    line and an eager run instead of a crash at step 1."""
    compiled = torch.compile(model)
    try:
        with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []), rt.autocast:
            loss_fn(compiled, batch).backward()
        return compiled
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        warn_fallback("torch.compile", e)
        return model
    finally:
        model.zero_grad(set_to_none=True)


class Prefetcher:
    """Prepares the next batches in a background thread (pinned memory on CUDA), so the
    accelerator never waits for the data reader."""

    def __init__(self, data, start_index: int, device: torch.device, depth: int = 2):
        self.device = device
        self.queue = queue.Queue(maxsize=depth)
        self.stopped = False
        self.thread = threading.Thread(target=self._fill, args=(data, start_index), daemon=True)
        self.thread.start()

    def _fill(self, data, index):
        while not self.stopped:
            try:
                batch = data.batch(index)
                if self.device.type == "cuda":
                    batch = {k: t.pin_memory() for k, t in batch.items()}
            except Exception as e:  # handed to the training thread, which re-raises it
                batch = e
            self.queue.put(batch)
            index += 1

    def next(self):
        batch = self.queue.get()
        if isinstance(batch, Exception):
            raise batch
        return to_device(batch, self.device)

    def close(self):
        self.stopped = True
        while self.thread.is_alive():  # unblock a put() waiting on a full queue
            with contextlib.suppress(queue.Empty):
                self.queue.get_nowait()
            self.thread.join(timeout=0.05)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: t.to(device, non_blocking=True) for k, t in batch.items()}


def default_loss(model, batch: dict):
    return model(**batch)[1]


@torch.no_grad()
def evaluate(model, data, n_batches: int, rt: Runtime, loss_fn=default_loss) -> float:
    model.eval()
    total = torch.zeros((), device=rt.device)
    for i in range(n_batches):
        with rt.autocast:
            total += loss_fn(model, to_device(data.batch(i), rt.device)).float()
    model.train()
    return rt.all_mean(total / n_batches).item()


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resumable(ckpt: dict, model_cfg: ModelConfig, cfg: TrainConfig, path: str):
    """Refuse to resume into a different model or a different data order: one line naming the field."""
    for name, value in asdict(model_cfg).items():
        if ckpt["config"].get(name) != value:
            raise UserError(f"{path} was trained with {name}={ckpt['config'].get(name)!r} but this run "
                            f"has {name}={value!r}; use the same settings or a new --out_dir")
    for name in ("batch_size", "grad_accum", "seed"):
        old = ckpt.get("train_config", {}).get(name)
        if old != getattr(cfg, name):
            raise UserError(f"{path} was trained with {name}={old!r} but this run has "
                            f"{name}={getattr(cfg, name)!r}; the data order would change")
    old = ckpt.get("train_config", {}).get("optimizer", "adamw")
    if old != cfg.optimizer:
        raise UserError(f"{path} was trained with optimizer={old!r} but this run has optimizer={cfg.optimizer!r}; "
                        f"its optimizer state cannot carry over: use --optimizer {old} or a new --out_dir")


class LogWindow:
    """The steps since the last log line. Their loss is summed on the device (reading it is a host sync:
    only at log steps and saves); tokens and FLOPs are counted from batch shapes (rows can be padded
    shorter than seq_len), all ranks together, for tokens/s and MFU."""

    def __init__(self, rt: Runtime, flops_per_token):
        self.rt, self.flops_per_token = rt, flops_per_token
        self.loss_sum, self.steps, self.tokens, self.flops = torch.zeros((), device=rt.device), 0, 0, 0
        self.start = None  # set by the loop when the window's first step begins

    def add(self, loss: torch.Tensor, tokens: torch.Tensor):
        """One micro-batch."""
        self.loss_sum += loss.detach().float()
        self.tokens += tokens.numel() * self.rt.world_size
        self.flops += self.flops_per_token(tokens.shape[1]) * tokens.numel() * self.rt.world_size

    def mean_loss(self) -> float:
        return self.rt.all_mean(self.loss_sum / max(1, self.steps)).item()


def optimizer_step(model, optimizers: list, prefetch: Prefetcher, loss_fn, cfg: TrainConfig, rt: Runtime,
                   window: LogWindow):
    """One optimizer step: cfg.grad_accum micro-batches forward and backward, then clip and update."""
    for micro in range(cfg.grad_accum):
        batch = prefetch.next()
        # Gradients are all-reduced only on the last micro-batch of the step.
        sync = micro == cfg.grad_accum - 1 or not rt.ddp
        with (contextlib.nullcontext() if sync else model.no_sync()), rt.autocast:
            loss = loss_fn(model, batch) / cfg.grad_accum
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


class Run:
    """The loop's state between optimizer steps and the bookkeeping after each: logging, the divergence
    check, evaluation and checkpoints, stopping. Only rank 0 prints and writes. As a context manager it
    turns Ctrl-C into a flag, so that the loop stops between steps and saves."""

    def __init__(self, cfg: TrainConfig, model: Transformer, optimizers: list, rt: Runtime, tokenizer: str,
                 start: dict, evaluate=None):
        self.cfg, self.model, self.optimizers, self.rt, self.tokenizer = cfg, model, optimizers, rt, tokenizer
        self.evaluate = evaluate  # the validation loss, or None without validation data
        self.step, self.val_loss, self.best_val = 0, None, float("inf")
        if start:
            self.step, self.best_val = start["step"], start.get("best_val_loss", float("inf"))
        os.makedirs(cfg.out_dir, exist_ok=True)
        self.last_path, self.best_path = os.path.join(cfg.out_dir, "last.pt"), os.path.join(cfg.out_dir, "best.pt")
        self.metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.interrupted = False
        self.peak_flops = peak_flops(rt, cfg.peak_tflops) * rt.world_size
        self.window = LogWindow(rt, model.flops_per_token)
        self.bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not rt.master, dynamic_ncols=True, desc="train")

    def __enter__(self):  # only the main thread may handle signals
        self.previous_handler = signal.signal(signal.SIGINT, lambda *_: setattr(self, "interrupted", True)) \
            if threading.current_thread() is threading.main_thread() else None
        return self

    def __exit__(self, *exc):
        self.bar.close()
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)

    def say(self, message: str):
        if self.rt.master:
            tqdm.write(message)

    def log(self, record: dict):
        if self.rt.master:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def log_window(self, lr: float):
        """Loss, tokens/s and MFU of the steps since the last log line, to the bar and metrics.jsonl."""
        train_loss = self.window.mean_loss()  # the only per-log host sync
        if not math.isfinite(train_loss):
            self.stop_if_diverged(train_loss)
        elapsed = time.perf_counter() - self.window.start
        tok_s, mfu = self.window.tokens / elapsed, self.window.flops / elapsed / self.peak_flops
        self.bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:,.0f}", mfu=f"{mfu:.1%}")
        self.log({"step": self.step, "loss": train_loss, "lr": lr, "tokens_per_s": tok_s, "mfu": mfu})
        self.window = LogWindow(self.rt, self.model.flops_per_token)

    def stop_if_diverged(self, window_loss: float = None):
        """Every rank, before every save: the losses not yet checked at a log step (window_loss, when
        the caller has it already), and the weights themselves (a step can make them non-finite while
        its own loss was finite)."""
        window_loss = self.window.mean_loss() if window_loss is None else window_loss
        bad = nonfinite_tensor(self.model.state_dict())
        if not math.isfinite(window_loss) or bad:
            what = f"loss is {window_loss}" if not math.isfinite(window_loss) else f"{bad} is not finite"
            raise FloatingPointError(f"{what} at step {self.step}; stopping with the last good checkpoint intact "
                                     f"({self.last_path}). Try a lower --lr.")

    def save(self, *paths: str):
        """This step's checkpoint, to each path, after one divergence check. The data position is not
        saved: batch i is a pure function of the seed and i, so the step gives it."""
        self.stop_if_diverged()
        if self.rt.master:
            # a LoRA run stores its adapters and which base they belong to; a full run every weight
            weights = {"model": adapter_state(self.model), "lora": self.model.lora} if is_lora(self.model) \
                else {"model": self.model.state_dict()}
            ckpt = {**weights, "config": asdict(self.model.cfg), "step": self.step,
                    "optimizer": [o.state_dict() for o in self.optimizers], "scaler": self.rt.scaler.state_dict(),
                    "rng": capture_rng(), "train_config": asdict(self.cfg), "tokenizer": self.tokenizer,
                    "val_loss": self.val_loss, "best_val_loss": self.best_val}
            for path in paths:
                save_checkpoint(ckpt, path)

    def evaluate_and_save(self):
        """The validation loss (with validation data), best.pt when it improved, then last.pt."""
        paths = [self.last_path]
        if self.evaluate:
            self.val_loss = self.evaluate()
            self.say(f"step {self.step}: val loss {self.val_loss:.4f}")
            self.log({"step": self.step, "val_loss": self.val_loss})
            if self.val_loss < self.best_val:
                self.best_val = self.val_loss
                paths.insert(0, self.best_path)
        self.save(*paths)

    def stop_at_step(self):
        self.save(self.last_path)
        self.say(f"stopped at step {self.step} as asked: saved {self.last_path}; continue with --resume true")

    def stop_if_ctrl_c(self):
        """Under DDP every rank must agree to stop, which costs a collective: only at log steps."""
        if (not self.rt.ddp or self.step % self.cfg.log_every == 0) and self.rt.any_rank(self.interrupted):
            self.save(self.last_path)
            self.bar.close()
            if self.rt.master:
                print(f"interrupted at step {self.step}: saved {self.last_path}; continue with --resume true",
                      file=sys.stderr)
            raise KeyboardInterrupt


def train(cfg: TrainConfig, model: Transformer, train_data, val_data=None, rt: Runtime = None,
          loss_fn=default_loss, tokenizer: str = "", start: dict = None) -> dict:
    """The training loop. `train_data.batch(i)` returns the dict of tensors passed to loss_fn(model, batch),
    by default model(**batch): tokens, targets and what else the data gives; train_data also has batch_size, seq_len
    (the longest row, for the memory estimate and MFU), num_tokens (all it holds) and tokens_per_row
    (on average, for the epochs report). `start` is a checkpoint to resume from.
    Returns {"step", "val_loss", "best_val_loss", "last_path"}."""
    rt = rt or Runtime(cfg)
    check_memory(model, cfg, getattr(train_data, "rows_per_batch", cfg.batch_size), train_data.seq_len, rt)
    report_epochs(cfg, train_data, rt)
    torch.manual_seed(cfg.seed + rt.rank)
    if is_lora(model) and rt.dtype != torch.float32:
        cast_frozen(model, rt.dtype)  # before the move: the device never holds the fp32 base
    model.to(rt.device)
    model.grad_checkpointing = cfg.grad_checkpointing
    optimizers = make_optimizers(model, cfg, rt)
    if start:
        states = start["optimizer"] if isinstance(start["optimizer"], list) else [start["optimizer"]]  # older runs
        for optimizer, state in zip(optimizers, states, strict=True):
            optimizer.load_state_dict(state)
        rt.scaler.load_state_dict(start["scaler"])
        restore_rng(start["rng"])
    raw_model = model
    if cfg.compile:
        model = compiled_or_eager(model, to_device(train_data.batch(0), rt.device), loss_fn, rt)
    if rt.ddp:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    validate = (lambda: evaluate(model, val_data, cfg.eval_batches, rt, loss_fn)) if val_data is not None else None
    run = Run(cfg, raw_model, optimizers, rt, tokenizer, start, validate)
    extended_from = getattr(raw_model, "extended_from", 0)  # a context being extended: report by position
    by_position = (lambda: loss_by_position(model, val_data, cfg.eval_batches, extended_from, rt)) \
        if extended_from and val_data is not None else None
    with run, contextlib.closing(Prefetcher(train_data, run.step * cfg.grad_accum, rt.device)) as prefetch:
        if run.step == 0 and validate:  # the starting point, to judge what training achieved
            run.log({"step": 0, "val_loss": validate()})
        if run.step == 0 and by_position:
            run.say(f"validation loss by position before: {by_position()}")
        while run.step < cfg.max_steps:
            if run.window.steps == 0:  # timed from here: the evaluation and saving before it are left out
                run.window.start = time.perf_counter()
            lr = lr_at(run.step, cfg)
            for optimizer in optimizers:  # Muon follows the same schedule from its own peak
                scale = (cfg.muon_lr or cfg.lr) / cfg.lr if isinstance(optimizer, torch.optim.Muon) else 1.0
                for group in optimizer.param_groups:
                    group["lr"] = lr * scale
            optimizer_step(model, optimizers, prefetch, loss_fn, cfg, rt, run.window)
            run.step += 1
            run.window.steps += 1
            run.bar.update(1)
            last_step = run.step == cfg.max_steps
            if run.step % cfg.log_every == 0 or last_step:
                run.log_window(lr)
            if run.step % cfg.eval_every == 0 or last_step:
                run.evaluate_and_save()
            if run.step == cfg.stop_at_step and not last_step:
                run.stop_at_step()
                break
            run.stop_if_ctrl_c()
        if by_position and run.step == cfg.max_steps:
            run.say(f"validation loss by position after: {by_position()}")
    return {"step": run.step, "val_loss": run.val_loss, "best_val_loss": run.best_val, "last_path": run.last_path}


def resume_or_init(cfg: TrainConfig, model_cfg: ModelConfig = None, init_from: str = "", lora: dict = None):
    """The model to train and, with --resume, the checkpoint to continue from. A fresh run
    starts from `init_from` (fine-tuning) or from new weights of `model_cfg` (pretraining).
    `lora` (rank, alpha, dropout, targets) trains adapters on the frozen init_from (lora.py)."""
    last = os.path.join(cfg.out_dir, "last.pt")
    if cfg.resume:
        start = read_checkpoint(last)
        model_cfg = model_cfg or ModelConfig.from_dict(start["config"])
        check_resumable(start, model_cfg, cfg, last)
        check_same_lora(start.get("lora"), lora, last)
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
        model, ckpt = load_model(init_from)
        if cfg.rope_scaling:
            model = longer_context(model, cfg)
        if lora:  # the tokens convert_hf.py added to an imported tokenizer are trained too
            add_lora(model, **lora, new_token_ids=ckpt.get("added_token_ids", []))
            model.lora = base_entries(model, init_from)
        return model, None
    return Transformer(model_cfg), None


def longer_context(model: Transformer, cfg: TrainConfig) -> Transformer:
    """The init_from model with its context extended to --seq_len by --rope_scaling (model.extend_context)."""
    seq_len = getattr(cfg, "seq_len", 0)
    if seq_len <= model.cfg.max_seq_len:
        raise UserError(f"--rope_scaling {cfg.rope_scaling} extends the context to --seq_len, which must be above the "
                        f"{model.cfg.max_seq_len} tokens the model was trained at (got {seq_len})")
    longer = extend_context(model, seq_len, cfg.rope_scaling, cfg.rope_factor)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"context: {model.cfg.max_seq_len} -> {seq_len} tokens, RoPE scaling {longer.cfg.rope_scaling}")
    return longer


@torch.no_grad()
def loss_by_position(model, data, n_batches: int, bucket: int, rt: Runtime) -> str:
    """Validation loss by position in the row, bucket tokens at a time (0-L, L-2L, ... for a context extended from
    L): the part beyond the trained length is what the extension must learn."""
    model.eval()
    sums = counts = 0
    for i in range(n_batches):
        batch = to_device(data.batch(i), rt.device)
        with rt.autocast:
            logits = model(**{k: v for k, v in batch.items() if k not in ("targets", "loss_weight")})[0]
        nll = F.cross_entropy(logits.float().transpose(1, 2), batch["targets"], ignore_index=-100, reduction="none")
        trained = batch["targets"] != -100  # (B, T)
        sums, counts = sums + (nll * trained).sum(0), counts + trained.sum(0)
    model.train()
    sums, counts = (rt.all_mean(t.float()) for t in (sums, counts))
    parts = [f"{lo}-{lo + bucket} {sums[lo:lo + bucket].sum() / counts[lo:lo + bucket].sum():.3f}"
             for lo in range(0, len(sums), bucket) if counts[lo:lo + bucket].sum() > 0]
    return ", ".join(parts)


def check_same_lora(saved: dict, wanted: dict, path: str):
    """A resumed run must train what it trained before: all weights, or adapters of the same shape."""
    saved = {k: saved[k] for k in ("rank", "alpha", "dropout", "targets")} if saved else None
    if wanted and saved:
        wanted = {**wanted, "targets": list(wanted["targets"])}
    if saved != wanted:
        def describe(s):
            return "LoRA " + ", ".join(f"{k}={v}" for k, v in s.items()) if s else "every weight (no LoRA)"
        raise UserError(f"{path} trained {describe(saved)} but this run asks for {describe(wanted)}; "
                        f"use the same --lora_* settings or a new --out_dir")


def pretrain(cfg: PretrainConfig) -> dict:
    from dataset import TokenShards
    rt = Runtime(cfg)
    train_data = TokenShards(cfg.train_data, cfg.seq_len, cfg.batch_size, cfg.seed, rt.rank, rt.world_size)
    val_data = TokenShards(cfg.val_data, cfg.seq_len, cfg.batch_size, cfg.seed, rt.rank, rt.world_size) \
        if cfg.val_data else None
    model_cfg = ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                            vocab_size=train_data.vocab_size, hidden_dim=cfg.hidden_dim, rope_theta=cfg.rope_theta,
                            max_seq_len=cfg.seq_len, tie_embeddings=cfg.tie_embeddings, dropout=cfg.dropout)
    model, start = resume_or_init(cfg, None if cfg.init_from else model_cfg, init_from=cfg.init_from)
    if train_data.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{cfg.train_data} was tokenized with {train_data.vocab_size} pieces but the model's "
                        f"vocab_size is {model.cfg.vocab_size}")
    if rt.master:
        print(f"model: {model.num_params() / 1e6:.2f}M parameters, {rt.device} {str(rt.dtype).removeprefix('torch.')}, "
              f"{train_data.num_tokens:,} training tokens")
    return train(cfg, model, train_data, val_data, rt, tokenizer=cfg.tokenizer, start=start)


def run_main(entry, cfg):
    """run_guarded for the training scripts. It first prints the resolved settings (defaults, --preset, flags;
    every checkpoint keeps them too); a NaN loss and running out of GPU memory are also one line; DDP's
    process group is closed however the run ends."""
    if int(os.environ.get("RANK", 0)) == 0:  # one block, not one per DDP process
        print(textwrap.fill(" ".join(f"{k}={v}" for k, v in asdict(cfg).items()), width=110, break_long_words=False,
                            break_on_hyphens=False, initial_indent="settings: ", subsequent_indent="  "), flush=True)
    try:
        return run_guarded(entry, cfg, errors=(ModelError, FloatingPointError))
    except torch.OutOfMemoryError:
        die(f"out of GPU memory with --batch_size {cfg.batch_size}: lower it (raise --grad_accum to keep the "
            f"same tokens per step), lower --seq_len, or add --grad_checkpointing true")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(pretrain, parse_config(PretrainConfig, presets=PRESETS, description=__doc__.strip().splitlines()[0]))
