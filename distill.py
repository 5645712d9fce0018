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
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cli import parse_config
from dataset_sft import read_conversations, render_prompt
from lora import load_model
from records import atomic_write
from tokenizer import Tokenizer, load_tokenizer, special_ids
from train import Runtime, default_loss, run_main
from train_sft import SFTConfig, finetune, resolve_tokenizer


@dataclass
class DistillConfig(SFTConfig):
    """Distillation's own values for every field a user tunes (none is inherited from fine-tuning's);
    the tokenizer, seq_len and the plumbing of train.py's TrainConfig are shared."""
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
    pack: bool = True              # several problems per row of seq_len (each attending only to itself): ~2x the
                                   # problems per second of padded rows
    answer_only: bool = False      # train on the replies without their <think> block (the ablation)


PRESETS = {
    "cpu": dict(batch_size=8, max_steps=500, lr=1e-3, min_lr=1e-4, pack=True),
    "12gb": dict(batch_size=8, grad_accum=8, max_steps=2000, lr=1e-4, min_lr=1e-5, warmup_steps=100,
                 eval_every=250, eval_batches=50, log_every=20, compile=True, pack=True),
}

WELL_FORMED = re.compile(r"^\s*<think>(.+?)</think>(.*\S.*)$", re.S)
THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.S)


def answer_only_file(path: str, out_dir: str) -> str:
    """A copy of a chat file (in our conversations format, other keys kept) in out_dir/answer_only/, every
    assistant reply without its leading <think>...</think> block: the same problems, answers only."""
    conversations, _ = read_conversations(path, verbose=False)
    out = os.path.join(out_dir, "answer_only", os.path.basename(path))
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


NUMBER = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?(?!\d)")


def states_answer(text: str, answer: str) -> bool:
    """Whether a final answer states `answer`. A numeric answer must be the last number in the
    text, compared as a number: "The sum is 50." and "答案是：50。" state 50, and so does 50.0,
    but 500, 5.0 and "50, not 49" do not. A word answer must appear as a whole word, any case."""
    try:
        expected = float(answer)
    except ValueError:
        return re.search(rf"(?<![A-Za-z0-9_]){re.escape(answer)}(?![A-Za-z0-9_])", text, re.I) is not None
    numbers = NUMBER.findall(text)
    return bool(numbers) and float(numbers[-1].replace(",", "")) == expected


@torch.no_grad()
def reasoning_report(model, tok: Tokenizer, path: str, n: int, max_new_tokens: int) -> dict:
    """Greedy answers to the first n problems of a held-out file: the share with a
    well-formed think block, and the share whose text after </think> states the answer (the
    whole reply when it has no think block), overall and by the records' "type" ("other" without one)."""
    conversations, _ = read_conversations(path, verbose=False)
    im_end = special_ids(tok)["im_end"]
    formed = correct = checkable = 0
    right, asked = Counter(), Counter()
    prompts = []
    for conv in conversations:
        first_reply = next(i for i, m in enumerate(conv.messages + [{"role": "assistant"}]) if m["role"] == "assistant")
        ids = render_prompt(tok, conv.messages[:first_reply])
        if len(ids) <= model.cfg.max_seq_len // 2:  # leave the model room to answer
            prompts.append((conv, ids))
    problems = prompts[:n]
    for conv, ids in problems:
        ids = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0, stop_ids=[im_end])
        text = tok.decode([i for i in ids if i != im_end])
        match = WELL_FORMED.match(text)
        formed += bool(match)
        if "answer" in conv.extra:
            checkable += 1
            after = match.group(2) if match else text.split("</think>")[-1]
            ok = states_answer(after, str(conv.extra["answer"]))
            correct += ok
            kind = str(conv.extra.get("type", "other"))
            right[kind] += ok
            asked[kind] += 1
    return {"problems": len(problems), "well_formed": formed / max(1, len(problems)),
            "accuracy": correct / checkable if checkable else None, "checkable": checkable, "correct": correct,
            "by_type": {kind: {"correct": right[kind], "problems": asked[kind]} for kind in sorted(asked)}}


def describe(report: dict) -> str:
    acc = "n/a" if report["accuracy"] is None else f"{report['accuracy']:.1%}"
    return f"well-formed <think> {report['well_formed']:.1%}, answer accuracy {acc} on {report['problems']} problems"


def describe_types(report: dict) -> str:
    """Right answers per problem type, which add up to the overall figure: "change 5/9, groups 3/4, ..."."""
    return ", ".join(f"{kind} {t['correct']}/{t['problems']}" for kind, t in report.get("by_type", {}).items())


def distill(cfg: DistillConfig) -> dict:
    rt = Runtime(cfg)
    loss_fn = default_loss
    if cfg.teacher:
        teacher = load_model(cfg.teacher, rt.device)[0]
        teacher.eval().requires_grad_(False)
        loss_fn = teacher_loss(teacher, cfg)
    resolve_tokenizer(cfg)
    tok = load_tokenizer(cfg.tokenizer)
    report_path = cfg.val_data or cfg.train_data  # the held-out problems, with their think blocks either way
    if cfg.answer_only and not cfg.resume:
        cfg.train_data = answer_only_file(cfg.train_data, cfg.out_dir)
        cfg.val_data = cfg.val_data and answer_only_file(cfg.val_data, cfg.out_dir)
        print(f"answer only: training on {cfg.train_data} (no <think> block in any reply)")
    elif cfg.answer_only:
        cfg.train_data, cfg.val_data = (os.path.join(cfg.out_dir, "answer_only", os.path.basename(p)) if p else p
                                        for p in (cfg.train_data, cfg.val_data))
    before = {}

    def report(model, result):
        if not cfg.eval_problems:
            return
        model.eval()
        after = reasoning_report(model, tok, report_path, cfg.eval_problems, cfg.eval_max_new_tokens)
        print(f"before distillation: {describe(before)}\nafter distillation:  {describe(after)}")
        if after["by_type"]:
            print(f"after, right by type: {describe_types(after)} ({after['correct']}/{after['checkable']})")
        result.update(before=before, after=after)

    if cfg.eval_problems and not cfg.resume:
        start_model = load_model(cfg.init_from)[0].eval()
        before.update(reasoning_report(start_model, tok, report_path, cfg.eval_problems, cfg.eval_max_new_tokens))
    elif cfg.eval_problems:
        before.update(problems=0, well_formed=float("nan"), accuracy=None)
    return finetune(cfg, think_weight=cfg.think_weight, loss_fn=loss_fn, after=report, rt=rt)


if __name__ == "__main__":
    run_main(distill, parse_config(DistillConfig, presets=PRESETS, description=__doc__.strip().splitlines()[0]))
