"""
Supervised fine-tuning on conversations, starting from a pretrained checkpoint (ours, or one
imported from Hugging Face with convert_hf.py). Same loop, precision, logging, atomic
checkpoints and --resume as pretraining (train.py); only the data changes: only the
assistant turns (and their closing <|im_end|>) are trained, see dataset_sft.py.

  python train_sft.py                                  # out/pretrain/best.pt + data/sft.jsonl -> out/sft
  python train_sft.py --init_from hf.pt --train_data my_chats.jsonl --seq_len 1024
  python train_sft.py --preset 12gb_lora --init_from smollm2.pt    # an import (convert_hf.py), with LoRA
  python train_sft.py --preset 12gb_qlora --init_from llama8b.pt   # QLoRA: the frozen base in 4 bits

With --lora_rank N only low-rank adapters are trained on the frozen model (lora.py): a 1-2B model fits a
12 GB card, and checkpoints hold the adapters alone. After training: the chat report on held-out chats
(evaluate.py) and the validation loss on pretraining's held-out text beside the chats'.
"""
from dataclasses import dataclass

from cli import parse_config
from dataset_sft import SFTData, chat_data
from runtime import Runtime, run_main
from train import FinetuneConfig, report_held_out, resume_or_init, train


@dataclass
class SFTConfig(FinetuneConfig):
    """Fine-tuning's own values for every field a user tunes (none is inherited from another stage's); the
    device, precision, seed, --resume, LoRA and the like are train.py's FinetuneConfig."""
    init_from: str = "out/pretrain/best.pt"
    train_data: str = "data/sft.jsonl"
    val_data: str = "data/sft_val.jsonl"
    out_dir: str = "out/sft"
    batch_size: int = 8            # rows per micro-batch per process: conversations, or packed rows with --pack
    grad_accum: int = 1
    max_steps: int = 300           # the cpu quickstart: ~1.5 epochs of the 4,000 built-in chats, packed
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 10
    log_every: int = 10
    pack: bool = True              # several chats per row of seq_len (each attending only to itself)
    chat_val: str = "data/sft_val.jsonl"  # the chat report's held-out chats (the same as val_data)
    eval_chats: int = 60
    eval_max_new_tokens: int = 128


PRESETS = {
    "cpu": {},  # the defaults above
    "12gb": dict(batch_size=8, grad_accum=8, max_steps=3000, lr=1e-4, min_lr=1e-5, warmup_steps=100,
                 eval_every=250, eval_batches=50, log_every=20, compile=True, pack=True),
    # LoRA on an imported 1-2B model (convert_hf.py): 4 x 1024 x 16 = 65,536 tokens per step (memory: README).
    "12gb_lora": dict(lora_rank=16, lora_alpha=32.0, seq_len=1024, batch_size=4, grad_accum=16, max_steps=2000,
                      lr=2e-4, min_lr=2e-5, warmup_steps=50, eval_every=250, eval_batches=50, log_every=20,
                      compile=True, pack=True, grad_checkpointing=True, text_val=""),  # not our tokenizer
}
# QLoRA: the same on a 3-8B import with its base held in 4 bits (an 8B base fits in about 9 GiB: README)
PRESETS["12gb_qlora"] = dict(PRESETS["12gb_lora"], base_quant="nf4")


def sft(cfg: SFTConfig) -> dict:
    rt = Runtime(cfg.device, cfg.dtype, cfg.memory_cap_gib)
    # ---- the model: init_from's weights (or LoRA adapters on them), or the run --resume continues
    model, start = resume_or_init(cfg, init_from=cfg.init_from, lora=cfg.lora())
    # ---- the data: conversations, only the assistant turns trained (packed several to a row with --pack)
    train_data, val_data = chat_data(cfg, model, rt, SFTData, pack=cfg.pack)
    # ---- train, with the model's own loss: cross-entropy on the trained tokens
    result = train(cfg, model, train_data, val_data, rt, tokenizer=cfg.tokenizer, start=start)
    # ---- report: replies to held-out chats, and the loss on pretraining's text beside the chats'
    result["chat"] = report_held_out(cfg, model, rt, train_data.tok, "SFT", {"chats": val_data})
    return result


if __name__ == "__main__":
    run_main(sft, parse_config(SFTConfig, presets=PRESETS, description=__doc__.strip().splitlines()[0]))
