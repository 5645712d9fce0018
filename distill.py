"""
R1-style reasoning distillation: fine-tune on <think>...</think> answers with the think
tags' loss weighted up (so a small model learns the reasoning format early), optionally
plus a logit-level KL term to a larger teacher that shares the tokenizer.

  python distill.py                                   # out/sft/best.pt + data/r1.jsonl -> out/distill
  python distill.py --teacher out/big/best.pt --kd_weight 0.5 --kd_temperature 2
  python distill.py --answer_only true --out_dir out/answer_only   # the ablation: no think block

Before and after training it reports, on held-out problems, how often the answer has a
well-formed <think>...</think> block and, where the data gives an "answer", how often the
text after </think> states it, overall and per problem type (the records' "type").

--answer_only true trains on the same problems with the <think> block cut from every reply (plain
SFT on the final answers, same steps): the ablation that shows what the worked traces are worth.
"""
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cli import parse_config
from dataset_sft import SFTData, chat_data
from evaluate import describe, describe_types, reasoning_report
from records import atomic_write, read_conversations
from runtime import Runtime, run_main
from train import FinetuneConfig, default_loss, frozen_copy, resume_or_init, train


@dataclass
class DistillConfig(FinetuneConfig):
    """Distillation's own values for every field a user tunes (none is inherited from another stage's); the
    tokenizer, seq_len, LoRA and the plumbing of the loop are train.py's FinetuneConfig."""
    init_from: str = "out/sft/best.pt"
    train_data: str = "data/r1.jsonl"
    val_data: str = "data/r1_val.jsonl"
    out_dir: str = "out/distill"
    batch_size: int = 8            # rows per micro-batch per process: conversations, or packed rows with --pack
    grad_accum: int = 1
    max_steps: int = 500           # cpu: 500 x 8 packed rows of 256 tokens ~ 3 epochs of the 4,000 built-in problems
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 10
    log_every: int = 10
    think_weight: float = 10.0     # loss weight of the <think> and </think> tokens (1 = plain SFT)
    teacher: str = ""              # checkpoint of a larger model with the same tokenizer
    kd_weight: float = 0.5         # loss = (1 - w) * cross-entropy + w * KL(teacher || student)
    kd_temperature: float = 2.0
    eval_problems: int = 50        # held-out problems for the format / accuracy report; 0 = skip
    eval_max_new_tokens: int = 160
    pack: bool = True              # several problems per row of seq_len (each attending only to itself): far
                                   # more problems per second than padded rows
    answer_only: bool = False      # train on the replies without their <think> block (the ablation)


PRESETS = {
    "cpu": {},  # the defaults above
    "12gb": dict(batch_size=8, grad_accum=8, max_steps=2000, lr=1e-4, min_lr=1e-5, warmup_steps=100,
                 eval_every=250, eval_batches=50, log_every=20, compile=True, pack=True),
}

THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.S)


def answer_only_file(path: str, out_dir: str, resume: bool = False) -> str:
    """A copy of a chat file (in our conversations format, other keys kept) in out_dir/answer_only/, every
    assistant reply without its leading <think>...</think> block: the same problems, answers only. A resumed
    run reads the copy its first run wrote."""
    out = os.path.join(out_dir, "answer_only", os.path.basename(path))
    if resume:
        return out
    conversations, _ = read_conversations(path, verbose=False)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with atomic_write(out) as f:
        for conv in conversations:
            messages = [dict(m, content=THINK_BLOCK.sub("", m["content"], count=1)) if m["role"] == "assistant"
                        else m for m in conv.messages]
            f.write(json.dumps({"conversations": messages, **conv.extra}, ensure_ascii=False) + "\n")
    return out


def teacher_loss(teacher, cfg: DistillConfig):
    """Cross-entropy (think-weighted) mixed with the KL divergence from the teacher's softened
    distribution, on trained positions only; the KL is scaled by T^2 so its gradients keep
    their size whatever the temperature (Hinton et al.)."""
    t = cfg.kd_temperature

    def loss_fn(model, batch):
        logits, ce = model(**batch)
        with torch.no_grad():  # the same rows, without targets (packed rows keep their positions and documents)
            teacher_logits = teacher(**{k: v for k, v in batch.items() if k not in ("targets", "loss_weight")})[0]
        trained = batch["targets"] != -100
        student = F.log_softmax(logits[trained].float() / t, dim=-1)
        target = F.log_softmax(teacher_logits[trained].float() / t, dim=-1)
        kl = F.kl_div(student, target, log_target=True, reduction="batchmean") * t * t
        return (1 - cfg.kd_weight) * ce + cfg.kd_weight * kl
    return loss_fn


def distill(cfg: DistillConfig) -> dict:
    rt = Runtime(cfg.device, cfg.dtype, cfg.memory_cap_gib)
    # ---- the model (and, with --teacher, the frozen teacher whose distribution the loss also follows)
    model, start = resume_or_init(cfg, init_from=cfg.init_from, lora=cfg.lora())
    loss_fn = teacher_loss(frozen_copy(cfg.teacher, rt), cfg) if cfg.teacher else default_loss
    # ---- the data: reasoning traces, the think tags' loss weighted up (--answer_only: the traces cut out)
    # the held-out problems of the report, with their think blocks either way
    problems = read_conversations(cfg.val_data or cfg.train_data, verbose=False)[0] if cfg.eval_problems else []
    if cfg.answer_only:
        cfg.train_data, cfg.val_data = (answer_only_file(p, cfg.out_dir, cfg.resume) if p else p
                                        for p in (cfg.train_data, cfg.val_data))
        print(f"answer only: training on {cfg.train_data} (no <think> block in any reply)")
    train_data, val_data = chat_data(cfg, model, rt, SFTData, think_weight=cfg.think_weight, pack=cfg.pack)
    # ---- report on held-out problems before and after training
    report = (lambda: reasoning_report(model, train_data.tok, problems, cfg.eval_problems,
                                       cfg.eval_max_new_tokens)) if cfg.eval_problems and rt.master else None
    before = report() if report and not cfg.resume else dict(problems=0, well_formed=float("nan"), accuracy=None)
    result = train(cfg, model, train_data, val_data, rt, loss_fn, cfg.tokenizer, start)
    if report:
        after = report()
        print(f"before distillation: {describe(before)}\nafter distillation:  {describe(after)}")
        if after["by_type"]:
            print(f"after, right by type: {describe_types(after)} ({after['correct']}/{after['checkable']})")
        result.update(before=before, after=after)
    return result


if __name__ == "__main__":
    run_main(distill, parse_config(DistillConfig, presets=PRESETS, description=__doc__.strip().splitlines()[0]))
