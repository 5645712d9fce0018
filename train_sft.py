"""
Supervised fine-tuning on conversations, starting from a pretrained checkpoint (ours, or one
imported from Hugging Face with convert_hf.py). Same loop, precision, logging, atomic
checkpoints and --resume as pretraining (train.py); only the data changes: only the
assistant turns (and their closing <|im_end|>) are trained, see dataset_sft.py.

  python train_sft.py                                  # out/pretrain/best.pt + data/sft.jsonl -> out/sft
  python train_sft.py --init_from hf.pt --train_data my_chats.jsonl --seq_len 1024
  python train_sft.py --preset 12gb_lora --init_from smollm2.pt    # an import (convert_hf.py), with LoRA

With --lora_rank N only low-rank adapters are trained on the frozen model (lora.py): a 1-2B model fits a
12 GB card, and checkpoints hold the adapters alone.
"""
import os
from dataclasses import dataclass

import torch

from cli import UserError, parse_config
from dataset_sft import SFTData
from lora import TARGETS
from train import Runtime, TrainConfig, resume_or_init, run_main, train


@dataclass
class SFTConfig(TrainConfig):
    """Fine-tuning's own values for every field a user tunes (none is inherited from pretraining's);
    the device, precision, seed, --resume and the like come from train.py's TrainConfig."""
    init_from: str = "out/pretrain/best.pt"
    train_data: str = "data/sft.jsonl"
    val_data: str = "data/sft_val.jsonl"
    tokenizer: str = ""            # empty: the one init_from (or the resumed run) names, else data/tokenizer.model
    seq_len: int = 0               # longest row in tokens; 0 = the model's max_seq_len
    pack: bool = False             # several conversations per row of seq_len, each attending only to itself
    shard_dir: str = ""            # where chat files are tokenized to (once); empty: beside each file
    num_workers: int = 0           # processes that tokenize a chat file into shards; 0 = one per core
    out_dir: str = "out/sft"
    batch_size: int = 8            # rows per micro-batch per process: conversations, or packed rows with --pack
    grad_accum: int = 1
    max_steps: int = 60            # the cpu quickstart: the template and the chat tasks; distillation does the rest
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 10
    log_every: int = 10
    lora_rank: int = 0             # > 0: train LoRA adapters of this rank on the frozen model; 0: every weight
    lora_alpha: float = 32.0       # the adapters' update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0
    lora_targets: str = ",".join(TARGETS)  # projections to adapt (transformers: q k v o_proj, gate down up_proj)

    def lora(self):
        """The LoRA settings for train.resume_or_init, or None for full fine-tuning."""
        if not self.lora_rank:
            return None
        return {"rank": self.lora_rank, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "targets": [t.strip() for t in self.lora_targets.split(",") if t.strip()]}


PRESETS = {
    "cpu": dict(batch_size=8, max_steps=60),
    "12gb": dict(batch_size=8, grad_accum=8, max_steps=3000, lr=1e-4, min_lr=1e-5, warmup_steps=100,
                 eval_every=250, eval_batches=50, log_every=20, compile=True, pack=True),
    # LoRA on an imported 1-2B model (convert_hf.py): 4 x 1024 x 16 = 65,536 tokens per step. Estimated peak,
    # bf16 base: TinyLlama-1.1B 4.5 GiB, SmolLM2-1.7B 6.5, Llama-3.2-1B 8.9 (its 128k-token head); see README.
    "12gb_lora": dict(lora_rank=16, lora_alpha=32.0, seq_len=1024, batch_size=4, grad_accum=16, max_steps=2000,
                      lr=2e-4, min_lr=2e-5, warmup_steps=50, eval_every=250, eval_batches=50, log_every=20,
                      compile=True, pack=True, grad_checkpointing=True),
}


def resolve_tokenizer(cfg: SFTConfig):
    """An empty --tokenizer becomes the one the starting checkpoint was trained with (an imported model's own
    tokenizer.json), read without loading its tensors: fine-tuning with another would train nonsense quietly."""
    if cfg.tokenizer:
        return
    path = os.path.join(cfg.out_dir, "last.pt") if cfg.resume else cfg.init_from
    try:
        recorded = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("tokenizer")
    except Exception:  # missing or damaged: loading the checkpoint itself reports it
        recorded = None
    cfg.tokenizer = recorded or "data/tokenizer.model"


def finetune(cfg: SFTConfig, think_weight=None, loss_fn=None, after=None, rt: Runtime = None, data_class=None,
             prepare=None) -> dict:
    """Fine-tune on chat data with train.py's loop; distill.py reuses this with think-token
    weights, an optional teacher loss, and `after(model, result)` for its final report. train_dpo.py
    gives its own data_class (built like SFTData, without think_weight and pack) and `prepare(model,
    train_data, val_data, rt)`, which returns (loss function, train data, validation data) once the model
    and the data are ready."""
    rt = rt or Runtime(cfg)
    model, start = resume_or_init(cfg, init_from=cfg.init_from, lora=cfg.lora())
    resolve_tokenizer(cfg)
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise UserError(f"--seq_len {seq_len} is longer than the model's max_seq_len {model.cfg.max_seq_len}")
    data = dict(tokenizer_path=cfg.tokenizer, seq_len=seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                rank=rt.rank, world_size=rt.world_size, shard_dir=cfg.shard_dir, num_workers=cfg.num_workers)
    if data_class is None:
        data_class, data = SFTData, dict(data, think_weight=think_weight, pack=cfg.pack)
    if not rt.master:
        rt.barrier()  # rank 0 tokenizes chat files without shards first; the other ranks then map its shards
    train_data = data_class(cfg.train_data, **data)
    val_data = data_class(cfg.val_data, **data) if cfg.val_data else None
    if rt.master:
        rt.barrier()
    if train_data.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{cfg.tokenizer} has {train_data.vocab_size} pieces but the model's vocab_size is "
                        f"{model.cfg.vocab_size}: use the tokenizer the model was trained with")
    if rt.master:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora = f" (LoRA: {trained / 1e6:.2f}M of them trained)" if cfg.lora_rank else ""
        packed = f" in {len(train_data):,} packed rows" if cfg.pack else ""
        what = f"{train_data.pairs:,} training pairs" if hasattr(train_data, "pairs") else \
            f"{train_data.conversations:,} training conversations{packed}"
        print(f"model: {model.num_params() / 1e6:.2f}M parameters{lora} from {cfg.init_from}, tokenizer "
              f"{cfg.tokenizer}; {what}")
    if prepare:
        loss_fn, train_data, val_data = prepare(model, train_data, val_data, rt)
    kwargs = {"loss_fn": loss_fn} if loss_fn else {}
    result = train(cfg, model, train_data, val_data, rt, tokenizer=cfg.tokenizer, start=start, **kwargs)
    if after and rt.master:
        after(model, result)
    return result


if __name__ == "__main__":
    run_main(finetune, parse_config(SFTConfig, presets=PRESETS, description=__doc__.strip().splitlines()[0]))
