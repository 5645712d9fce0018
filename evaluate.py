"""
Evaluation that more than one script reports: the validation loss (and, for a context being extended, the loss
by position), whether a reply states an answer (answer matching), the reasoning report on held-out problems
(distill.py and train_dpo.py, before and after), and the chat report on held-out chats (after SFT and distillation).

  validation_loss(model, data, ...) the mean loss over the first batches of held-out data (train.py's loop)
  loss_by_position(model, data, ...) the same by position in the row, a bucket of positions at a time
  states_answer(text, answer)       the final answer in `text` is `answer` (numbers compared as numbers)
  answer_is_right(reply, answer)    the text after </think> states the answer (the report's and GRPO's reward's)
  read_problems(path, tok, ...)     a chat file's problems as (conversation, prompt ids)
  reasoning_report(model, tok, ...) greedy replies to held-out problems: well-formed <think> blocks and right
                                    answers, overall and per problem type
  pass_at_k(model, tok, ...)        the share of problems that one of k sampled replies gets right
  describe(report), describe_types(report)   the report's lines
  reply_is_right(reply, check)      a chat reply against what the built-in data knows of it (offline_data.py)
  chat_report(model, tok, ...)      greedy replies to held-out chats: right per type (greetings, facts, stories,
                                    questions about a story), and how many were answered as a sum instead

A reply is well formed when it opens with <think>, reasons (an empty block is not reasoning), closes it with
</think>, and says something after it; the answer is read from the text after </think> (the whole reply when it
has no think block).
"""
import re
from collections import Counter

import torch
import torch.nn.functional as F

from records import read_conversations
from tokenizer import Tokenizer, render_prompt, special_ids

WELL_FORMED = re.compile(r"^\s*<think>(.*?\S.*?)</think>(.*\S.*)$", re.S)  # some reasoning, then an answer
# a word said three times running ("now now now", "现在现在现在"): a model stuck in a loop, not a sentence
STUTTER = re.compile(r"\b([^\W\d_]+)(?:\s+\1\b){2,}|([\u4e00-\u9fff]{1,4})\2{2,}", re.I)
NUMBER = re.compile(r"(?<![\d.])-?\d+(?:,\d{3})*(?:\.\d+)?(?!\d)")
SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s*")
# how a reasoning problem's reply ends: "The sum is 17.", "答案是：17。" (a story may hold sums; that is no answer)
PROBLEM_ANSWER = re.compile(r"\bsum is\b|答案是", re.I)
MIN_ROOM = 32  # the chat report skips a chat whose prompt leaves the model fewer tokens to answer in
# chat types whose questions the reasoning data also asks (sums, which number is bigger, letters in a word): working
# them in a think block is the right habit, not a chat answered as a problem
ASKED_AS_PROBLEMS = ("math", "numbers", "word")
CHAT_GOAL_TYPES = ("fact", "greeting", "story question")  # the chat report's headline: what a chat model must get


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


def answer_is_right(reply: str, answer) -> bool:
    """Whether a reply to a problem states its answer in the text after </think> (the whole reply when it has no
    think block): the one answer check of the reasoning report and of train_grpo.py's reward."""
    match = WELL_FORMED.match(reply)
    return states_answer(match.group(2) if match else reply.split("</think>")[-1], str(answer))


def well_formed(reply: str) -> bool:
    """Some reasoning in a think block, then an answer, and no word stuttered three times running anywhere: what
    the reasoning report counts as well-formed and train_grpo.py's reward pays a little for."""
    return WELL_FORMED.match(reply) is not None and STUTTER.search(reply) is None


def read_problems(path: str, tok: Tokenizer, max_prompt: int) -> list:
    """(conversation, prompt ids) of each problem in a chat file whose prompt (the turns before the first reply)
    is at most max_prompt tokens, in file order; its record's "answer" (and "type") are in conversation.extra."""
    problems = []
    for conv in read_conversations(path, verbose=False)[0]:
        first_reply = next(i for i, m in enumerate(conv.messages + [{"role": "assistant"}]) if m["role"] == "assistant")
        ids = render_prompt(tok, conv.messages[:first_reply])
        if len(ids) <= max_prompt:
            problems.append((conv, ids))
    return problems


@torch.no_grad()
def reasoning_report(model, tok: Tokenizer, path: str, n: int, max_new_tokens: int) -> dict:
    """Greedy answers to the first n problems of a held-out chat file: the share well-formed (well_formed: a think
    block, then an answer, no stutter), and the share whose text after </think> states the answer (the
    whole reply when it has no think block), overall and by the records' "type" ("other" without one)."""
    im_end = special_ids(tok)["im_end"]
    formed = correct = checkable = 0
    right, asked = Counter(), Counter()
    problems = read_problems(path, tok, model.cfg.max_seq_len // 2)[:n]  # leave the model room to answer
    for conv, ids in problems:
        ids = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0, stop_ids=[im_end])
        text = tok.decode([i for i in ids if i != im_end])
        formed += well_formed(text)
        if "answer" in conv.extra:
            checkable += 1
            ok = answer_is_right(text, conv.extra["answer"])
            correct += ok
            kind = str(conv.extra.get("type", "other"))
            right[kind] += ok
            asked[kind] += 1
    return {"problems": len(problems), "well_formed": formed / max(1, len(problems)),
            "accuracy": correct / checkable if checkable else None, "checkable": checkable, "correct": correct,
            "by_type": {kind: {"correct": right[kind], "problems": asked[kind]} for kind in sorted(asked)}}


@torch.no_grad()
def pass_at_k(model, tok: Tokenizer, path: str, n: int, k: int, max_new_tokens: int, temperature: float = 1.0,
              seed: int = 0) -> float:
    """The share of the first n held-out problems (with an answer) that at least one of k sampled replies gets
    right: what reinforcement learning can at most reach by making the model pick its best answers."""
    im_end = special_ids(tok)["im_end"]
    problems = [(c, ids) for c, ids in read_problems(path, tok, model.cfg.max_seq_len // 2) if "answer" in c.extra]
    generator = torch.Generator(model.tok_embeddings.weight.device).manual_seed(seed)
    solved = 0
    for conv, ids in problems[:n]:
        replies = model.generate_batch([ids], k, max_new_tokens, temperature, stop_ids=[im_end], generator=generator)
        solved += any(answer_is_right(tok.decode([i for i in r if i != im_end]), conv.extra["answer"])
                      for r in replies)
    return solved / max(1, min(n, len(problems)))


def describe(report: dict) -> str:
    acc = "n/a" if report["accuracy"] is None else f"{report['accuracy']:.1%}"
    return f"well-formed <think> {report['well_formed']:.1%}, answer accuracy {acc} on {report['problems']} problems"


def describe_types(report: dict) -> str:
    """Right answers per problem type, which add up to the overall figure: "change 5/9, groups 3/4, ..."."""
    return ", ".join(f"{kind} {t['correct']}/{t['problems']}" for kind, t in report.get("by_type", {}).items())


def sentences(text: str) -> list:
    """A reply's sentences, each lowercased with its spaces collapsed (English and Chinese punctuation)."""
    return [" ".join(part.lower().split()) for part in SENTENCE_END.split(text) if part.strip()]


def reply_is_right(reply: str, check: dict) -> bool:
    """Whether a chat reply (its text after any think block) is right by its record's check: with "mentions", it
    names every one of them (a story asked about a character and a place); with "replies", it says something and
    every sentence it says is a sentence of one of them (so any true lion facts, in any order, are right)."""
    if "mentions" in check:
        return bool(reply.strip()) and all(word.lower() in reply.lower() for word in check["mentions"])
    allowed = {sentence for right in check["replies"] for sentence in sentences(right)}
    said = sentences(reply)
    return bool(said) and set(said) <= allowed


@torch.no_grad()
def chat_report(model, tok: Tokenizer, path: str, n: int, max_new_tokens: int) -> dict:
    """Greedy replies to the last message of the first n chats of a held-out file whose records say how to score
    it (a "type" and "replies" or "mentions", as offline_data.py writes them): right per type, the share right among
    CHAT_GOAL_TYPES, and "sums": the chat prompts (not ASKED_AS_PROBLEMS) answered wrongly as a reasoning problem
    (worked in a think block, or ending "The sum is ..." / "答案是"), as a model that only learned problems does."""
    im_end = special_ids(tok)["im_end"]
    right, asked = Counter(), Counter()
    sums = 0
    chats = [conv for conv in read_conversations(path, verbose=False)[0]
             if "type" in conv.extra and conv.messages[-1]["role"] == "assistant"]
    for conv in chats[:n]:
        ids = render_prompt(tok, conv.messages[:-1])
        room = min(max_new_tokens, model.cfg.max_seq_len - len(ids))  # a question after a story: a short answer
        if room < MIN_ROOM:
            continue
        ids = model.generate(ids, max_new_tokens=room, temperature=0, stop_ids=[im_end])
        text = tok.decode([i for i in ids if i != im_end])
        reply = text.split("</think>")[-1].strip()
        kind = conv.extra["type"]
        ok = reply_is_right(reply, conv.extra)
        right[kind] += ok
        asked[kind] += 1
        as_a_problem = WELL_FORMED.match(text) is not None or PROBLEM_ANSWER.search(reply) is not None
        sums += not ok and kind not in ASKED_AS_PROBLEMS and as_a_problem
    goal = [kind for kind in asked if kind in CHAT_GOAL_TYPES]
    return {"chats": sum(asked.values()), "right": sum(right.values()), "sums": sums,
            "goal_right": sum(right[k] for k in goal), "goal_chats": sum(asked[k] for k in goal),
            "by_type": {kind: {"correct": right[kind], "problems": asked[kind]} for kind in sorted(asked)}}


def describe_chat(report: dict) -> str:
    """The chat report in two lines: the headline share, the sums, and right per type."""
    if not report["chats"]:
        return "none of the held-out chats says how its reply is scored (the built-in chats do)"
    goal = report["goal_right"] / max(1, report["goal_chats"])
    return (f"{goal:.1%} of {report['goal_chats']} greetings, facts and story questions right "
            f"({report['right']}/{report['chats']} chats in all); {report['sums']} chat prompts answered with a sum\n"
            f"  right by type: {describe_types(report)}")
