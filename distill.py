"""
R1-style reasoning distillation: fine-tune on <think>...</think> answers with the think
tags' loss weighted up (so a small model learns the reasoning format early) and the numbers'
in its reasoning and calls (which it copies from the question, and miscopies), optionally
plus a logit-level KL term to a larger teacher that shares the tokenizer.

  python distill.py                                   # out/sft/best.pt + data/r1.jsonl -> out/distill
  python distill.py --teacher out/big/best.pt --kd_weight 0.5 --kd_temperature 2
  python distill.py --answer_only true --out_dir out/answer_only   # the ablation: no think block

Before and after training it reports, on held-out problems, how often the answer has a
well-formed <think>...</think> block and, where the data gives an "answer", how often the
text after </think> states it, overall and per problem type (the records' "type").

--answer_only true trains on the same problems with the <think> block cut from every reply (plain
SFT on the final answers, same steps): the ablation that shows what the worked traces are worth.

--replay 0.3 (the default) mixes SFT's chats among the problems, 30% of the training conversations: distilling
on reasoning alone overwrote what SFT taught (the model answered "Tell me about lions." with "The sum is 17.").
After training, the chat report and the validation loss on every stage's held-out data show what was kept.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cli import parse_config
from dataset_sft import SFTData, answer_only_file, chat_data, read_chats, replay_mix
from evaluate import describe, describe_tools, describe_types, reasoning_report, tool_report
from runtime import Runtime, run_main
from train import FinetuneConfig, default_loss, frozen_copy, report_held_out, resume_or_init, train


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
    max_steps: int = 600           # cpu: 600 x 8 packed rows of 256 tokens ~ 2.5 epochs of the 4,000 built-in
                                   # problems and 1,714 replayed chats
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 10
    log_every: int = 10
    think_weight: float = 10.0     # loss weight of the <think> and </think> tokens (1 = plain SFT)
    number_weight: float = 5.0     # loss weight of the numbers in think blocks and calls: what a small model miscopies
    teacher: str = ""              # checkpoint of a larger model with the same tokenizer
    kd_weight: float = 0.5         # loss = (1 - w) * cross-entropy + w * KL(teacher || student)
    kd_temperature: float = 2.0
    eval_problems: int = 50        # held-out problems for the format / accuracy report; 0 = skip
    eval_max_new_tokens: int = 160
    pack: bool = True              # several problems per row of seq_len (each attending only to itself): far
                                   # more problems per second than padded rows
    answer_only: bool = False      # train on the replies without their <think> block (the ablation)
    replay: float = 0.3            # share of the training conversations that are chats replayed from replay_data,
                                   # so that distillation keeps what SFT taught; 0 = reasoning alone
    replay_data: str = "data/sft.jsonl"
    chat_val: str = "data/sft_val.jsonl"  # SFT's held-out chats: the chat report and their loss after training
    eval_chats: int = 60


PRESETS = {
    "cpu": {},  # the defaults above
    "12gb": dict(batch_size=8, grad_accum=8, max_steps=2000, lr=1e-4, min_lr=1e-5, warmup_steps=100,
                 eval_every=250, eval_batches=50, log_every=20, compile=True, pack=True),
}

def teacher_loss(teacher, cfg: DistillConfig):
    """Cross-entropy (think-weighted) mixed with the KL divergence from the teacher's softened
    distribution, on trained positions only; the KL is scaled by T^2 so its gradients keep
    their size whatever the temperature (Hinton et al.)."""
    t = cfg.kd_temperature

    def loss_fn(model, batch):
        logits, ce = model(**batch, keep_logits=True)  # (the KL needs the whole logits: no chunked loss)
        with torch.no_grad():  # the same rows, without targets (packed rows keep their positions and documents)
            teacher_logits = teacher(**{k: v for k, v in batch.items() if k not in ("targets", "loss_weight")})[0]
        trained = batch["targets"] != -100
        student = F.log_softmax(logits[trained].float() / t, dim=-1)
        target = F.log_softmax(teacher_logits[trained].float() / t, dim=-1)
        kl = F.kl_div(student, target, log_target=True, reduction="batchmean") * t * t
        return (1 - cfg.kd_weight) * ce + cfg.kd_weight * kl
    return loss_fn


def replayed_file(path: str, cfg: DistillConfig) -> str:
    """The chat file `path` with cfg.replay of SFT's chats mixed in (dataset_sft.replay_mix), written once to
    out_dir/replay/; a resumed run reads the file its first run wrote."""
    out = os.path.join(cfg.out_dir, "replay", os.path.basename(path))
    if not cfg.resume:
        problems, chats = replay_mix(path, cfg.replay_data, cfg.replay, cfg.seed, out)
        print(f"replay: {chats:,} chats from {cfg.replay_data} among {problems:,} problems "
              f"({chats / (problems + chats):.0%} of {problems + chats:,}) in {out}")
    return out


def distill(cfg: DistillConfig) -> dict:
    rt = Runtime(cfg.device, cfg.dtype, cfg.memory_cap_gib)
    # ---- the model (and, with --teacher, the frozen teacher whose distribution the loss also follows)
    model, start = resume_or_init(cfg, init_from=cfg.init_from, lora=cfg.lora())
    loss_fn = teacher_loss(frozen_copy(cfg.teacher, rt), cfg) if cfg.teacher else default_loss
    # ---- the data: reasoning traces, the think tags' and the numbers' loss weighted up (--answer_only: the traces
    # cut out), with SFT's chats replayed among them; the report's held-out problems keep their think blocks either way
    problems = cfg.val_data or cfg.train_data
    paths = cfg.train_data, cfg.val_data
    if cfg.answer_only:
        paths = tuple(answer_only_file(p, cfg.out_dir, cfg.resume) if p else p for p in paths)
        print(f"answer only: training on {paths[0]} (no <think> block in any reply)")
    if cfg.replay:
        paths = replayed_file(paths[0], cfg), paths[1]
    train_data, val_data = chat_data(cfg, model, rt, SFTData, paths, think_weight=cfg.think_weight,
                                     number_weight=cfg.number_weight, pack=cfg.pack)
    # SFT's held-out chats, for the report after (report_held_out says so when there are none)
    chats_val = read_chats(cfg, model, rt, [cfg.chat_val])[0] if os.path.exists(cfg.chat_val) else None
    # ---- train, reporting on held-out problems before and after
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
        if train_data.tok.chat_ids["tool_call"] is not None:  # the same problems, the calculator offered
            result["tools"] = tool_report(model, train_data.tok, problems, cfg.eval_problems, cfg.eval_max_new_tokens)
            print(f"after, with the calculator: {describe_tools(result['tools'])}")
    # ---- and on held-out chats: did the model keep chatting? (and the loss on every stage's held-out data)
    result["chat"] = report_held_out(cfg, model, rt, train_data.tok, "distillation",
                                     {"chats": chats_val, "reasoning": val_data})
    return result


if __name__ == "__main__":
    run_main(distill, parse_config(DistillConfig, presets=PRESETS, description=__doc__.strip().splitlines()[0]))
