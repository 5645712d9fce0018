"""
Evaluation that more than one script reports: the validation loss (and, for a context being extended, the loss
by position), whether a reply states an answer (answer matching), and the reasoning report on held-out problems
(distill.py and train_dpo.py, before and after).

  validation_loss(model, data, ...) the mean loss over the first batches of held-out data (train.py's loop)
  loss_by_position(model, data, ...) the same by position in the row, a bucket of positions at a time
  states_answer(text, answer)       the final answer in `text` is `answer` (numbers compared as numbers)
  reasoning_report(model, tok, ...) greedy replies to held-out problems: well-formed <think> blocks and right
                                    answers, overall and per problem type
  describe(report), describe_types(report)   the report's lines

A reply is well formed when it opens with <think>, closes it with </think>, and says something after it; the
answer is read from the text after </think> (the whole reply when it has no think block).
"""
import re
from collections import Counter

import torch
import torch.nn.functional as F

from tokenizer import Tokenizer, render_prompt, special_ids

WELL_FORMED = re.compile(r"^\s*<think>(.+?)</think>(.*\S.*)$", re.S)
NUMBER = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?(?!\d)")


@torch.no_grad()
def validation_loss(model, data, n_batches: int, rt, loss_fn) -> float:
    """The mean of loss_fn(model, batch) over data's first n_batches batches (the same ones every time), all
    ranks together; rt is the run's runtime.Runtime (device, autocast)."""
    model.eval()
    total = torch.zeros((), device=rt.device)
    for i in range(n_batches):
        with rt.autocast:
            total += loss_fn(model, rt.to_device(data.batch(i))).float()
    model.train()
    return rt.all_mean(total / n_batches).item()


@torch.no_grad()
def loss_by_position(model, data, n_batches: int, bucket: int, rt) -> str:
    """Validation loss by position in the row, bucket tokens at a time (0-L, L-2L, ... for a context extended from
    L): the part beyond the trained length is what the extension must learn."""
    model.eval()
    sums = counts = 0
    for i in range(n_batches):
        batch = rt.to_device(data.batch(i))
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
def reasoning_report(model, tok: Tokenizer, conversations: list, n: int, max_new_tokens: int) -> dict:
    """Greedy answers to the first n problems of held-out conversations (records.read_conversations of a file):
    the share with a well-formed think block, and the share whose text after </think> states the answer (the
    whole reply when it has no think block), overall and by the records' "type" ("other" without one)."""
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
