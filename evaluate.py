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
  tool_report(model, tok, ...)      the same problems with tools offered (the calculator): each call run and its
                                    result fed back; right answers by type, and the share of calls well-formed
  pass_at_k(model, tok, ...)        the share of problems that one of k sampled replies gets right
  describe(report), describe_types(report)   the report's lines
  reply_is_right(reply, check)      a chat reply against what the built-in data knows of it (offline_data.py)
  chat_report(model, tok, ...)      greedy replies to held-out chats: right per type (greetings, facts, stories,
                                    questions about a story), and how many were answered as a sum instead

A reply is well formed when it opens with <think>, reasons (an empty block is not reasoning), closes it with
</think>, and says something after it; the answer is read from the text after </think> (the whole reply when it
has no think block).

  load_checkpoint(path)             any checkpoint of this project, as a model (the generation scripts' loader too)
  harness_model(model, tok, ...)    the model as an lm-evaluation-harness model: any of its tasks runs on it

As a script it prints a checkpoint's report card (needs `pip install lm-eval`):
  python evaluate.py --ckpt out/distill/best.pt                  # the English card, the built-in held-out data
  python evaluate.py --ckpt out/sft/best.pt --language zh --chat true
  python evaluate.py --ckpt out/distill/best.pt --tasks arc_easy,piqa --limit 100
"""
import json
import os
import re
import socket
import tempfile
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import UserError, parse_config, run_guarded
from lora import merged_model
from model import ModelError, read_checkpoint
from quantize import int8_model
from records import atomic_write, read_conversations
from runtime import choose_device, choose_dtype
from tokenizer import Tokenizer, load_tokenizer, render_prompt, render_text, special_ids, split_reply
from tools import answer_call, calculator, error_result, tool_spec

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


def prompt_turns(conv) -> list:
    """A conversation's messages before its first reply: the problem as it is asked."""
    first_reply = next(i for i, m in enumerate(conv.messages + [{"role": "assistant"}]) if m["role"] == "assistant")
    return conv.messages[:first_reply]


def read_problems(path: str, tok: Tokenizer, max_prompt: int) -> list:
    """(conversation, prompt ids) of each problem in a chat file whose prompt (the turns before the first reply)
    is at most max_prompt tokens, in file order; its record's "answer" (and "type") are in conversation.extra."""
    problems = []
    for conv in read_conversations(path, verbose=False)[0]:
        ids = render_prompt(tok, prompt_turns(conv))
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


MAX_TOOL_ROUNDS = 3  # replies with calls a problem may take before its answer
REPORT_TOOLS = {"calculator": calculator}  # what tool_report offers: the tool the built-in problems are solved with


def run_calls(call_texts: list, tools: dict) -> tuple:
    """(the calls that parse, a result for every call, how many were well-formed) of a reply's call texts: a call
    that does not parse gets an error result, as does one run_call refuses (an unknown tool, wrong arguments, an
    expression the calculator cannot read); well-formed means neither."""
    answered = [answer_call(text, tools) for text in call_texts]
    results = [result for _, result in answered]
    return [call for call, _ in answered if call], results, sum(not r.startswith(error_result("")) for r in results)


@torch.no_grad()
def tool_report(model, tok: Tokenizer, path: str, n: int, max_new_tokens: int, tools: dict = REPORT_TOOLS) -> dict:
    """Greedy answers to the first n problems of a held-out chat file (as reasoning_report) asked with `tools`
    offered (name -> function, tools.py): each reply's calls are run and their results fed back, up to
    MAX_TOOL_ROUNDS replies with calls, then the last reply's answer is checked. The share right, overall and by type;
    how many problems called a tool; the share of calls well-formed (run_calls)."""
    im_end = special_ids(tok)["im_end"]
    specs = [tool_spec(fn) for fn in tools.values()]
    right, by_type, called, calls, formed = Counter(), Counter(), 0, 0, 0
    problems = [(conv, prompt_turns(conv)) for conv, _ in read_problems(path, tok, model.cfg.max_seq_len // 2)
                if "answer" in conv.extra][:n]
    for conv, messages in tqdm(problems, desc="tool report", leave=False, disable=None):
        for rounds in range(MAX_TOOL_ROUNDS + 1):
            ids = render_prompt(tok, messages, tools=specs)
            room = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
            text = tok.decode([i for i in model.generate(ids, max_new_tokens=room, temperature=0, stop_ids=[im_end])
                               if i != im_end]) if room > 0 else ""
            content, call_texts = split_reply(text)
            if not call_texts or rounds == MAX_TOOL_ROUNDS:
                break
            parsed, results, ok = run_calls(call_texts, tools)
            called, calls, formed = called + (rounds == 0), calls + len(call_texts), formed + ok
            messages = messages + [{"role": "assistant", "content": content, "tool_calls": parsed}] + \
                [{"role": "tool", "content": result} for result in results]
        kind = str(conv.extra.get("type", "other"))
        right[kind] += answer_is_right(text, conv.extra["answer"])
        by_type[kind] += 1
    return {"problems": len(problems), "accuracy": sum(right.values()) / max(1, len(problems)),
            "correct": sum(right.values()), "called": called, "calls": calls,
            "well_formed_calls": formed / calls if calls else None,
            "by_type": {kind: {"correct": right[kind], "problems": by_type[kind]} for kind in sorted(by_type)}}


def describe_tools(report: dict) -> str:
    formed = "n/a" if report["well_formed_calls"] is None else f"{report['well_formed_calls']:.1%}"
    return f"answer accuracy {report['accuracy']:.1%} on {report['problems']} problems, {report['called']} of them " \
           f"calling a tool ({report['calls']} calls, {formed} well-formed); right by type: {describe_types(report)}"


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


# -----------------------------------------------------------------------------
# the report card: lm-evaluation-harness's tasks run on our model directly (no export)

def load_checkpoint(path: str, device="cpu") -> tuple:
    """(model, checkpoint) of any checkpoint of this project: whole weights, an NF4 base (dequantized), LoRA adapters
    (merged into their base) or int8 weights (quantize.py). The one loader of the generation scripts and the card."""
    ckpt = read_checkpoint(path)
    model = int8_model(ckpt, path) if ckpt.get("quantization") else merged_model(ckpt, path)
    return model.to(device), ckpt


def harness_model(model, tok: Tokenizer, chat: bool = False, batch_size: int = 16):
    """Our model as an lm-evaluation-harness model (lm_eval.api.model.TemplateLM: its context / continuation
    split and empty-context rule, as its own `hf` model has them), so any of its tasks runs on it. Texts are our
    tokenizer's ids with the document separator (eos) before an empty context, as pretraining saw documents; with
    chat, lm-eval renders its prompts with our chat template. (The class is made here because lm-eval is imported
    only for the report card: the training scripts import this file too.)"""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    device = next(model.parameters()).device
    length = model.cfg.max_seq_len

    class OurModel(TemplateLM):
        tokenizer_name = "tinychat-chatml"

        @property
        def eot_token_id(self):
            return tok.eos_id

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return tok.encode(string)

        def apply_chat_template(self, chat_history, add_generation_prompt=True):
            return render_text(chat_history, add_generation_prompt)

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            """(sum of log p(continuation), whether greedy decoding gives it) for (strings, context ids,
            continuation ids): the last max_seq_len tokens of context + continuation in one forward pass, the
            longest rows batched first."""
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            results = [None] * len(requests)
            for start in tqdm(range(0, len(order), batch_size), desc="log-likelihoods", leave=False,
                              disable=disable_tqdm):
                batch = [requests[i] for i in order[start:start + batch_size]]
                rows = [(ctx + cont)[-(length + 1):][:-1] for _, ctx, cont in batch]
                tokens = torch.full((len(rows), max(map(len, rows))), tok.eos_id, dtype=torch.long)
                for r, row in enumerate(rows):
                    tokens[r, :len(row)] = torch.tensor(row)  # right-padded: a causal row never sees its padding
                logits = model(tokens.to(device))[0]  # (B, T, vocab)
                for r, (i, (_, _, cont)) in enumerate(zip(order[start:start + batch_size], batch)):
                    # the continuation's positions only, in fp32: (len(cont), vocab)
                    picked = F.log_softmax(logits[r, len(rows[r]) - len(cont):len(rows[r])].float(), dim=-1)
                    target = torch.tensor(cont, device=device)
                    results[i] = (picked.gather(1, target[:, None]).sum().item(),
                                  bool((picked.argmax(-1) == target).all()))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """Each text's whole log-likelihood after the separator, in windows of max_seq_len tokens that each
            predict new tokens only (lm-eval's rolling windows)."""
            totals = []
            for (text,) in tqdm([r.args for r in requests], desc="perplexity", leave=False, disable=disable_tqdm):
                windows = map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tok.encode(text), prefix_token=tok.eos_id, max_seq_len=length, context_len=1))
                totals.append(sum(ll for ll, _ in self._loglikelihood_tokens(
                    [(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)))
            return totals

        def generate_until(self, requests, disable_tqdm=False):
            """Greedy replies, batch_size prompts with the same settings at a time (model.generate_batch: a row
            is what generate gives it alone), cut before the first of the request's stop strings; the context
            left-truncated to leave max_gen_toks of room, as lm-eval's hf model does."""
            stops = [tok.eos_id] + ([special_ids(tok)["im_end"]] if chat else [])
            groups = {}
            for i, (_, kwargs) in enumerate(r.args for r in requests):
                groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(i)
            replies = [None] * len(requests)
            bar = tqdm(total=len(requests), desc="generating", leave=False, disable=disable_tqdm)
            for indices in groups.values():
                kwargs = requests[indices[0]].args[1]
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else until
                room = kwargs.get("max_gen_toks", 256)
                for start in range(0, len(indices), batch_size):
                    chunk = indices[start:start + batch_size]
                    prompts = [tok.encode(requests[i].args[0])[-max(1, length - room):] for i in chunk]
                    for i, ids in zip(chunk, model.generate_batch(prompts, max_new_tokens=room, temperature=0,
                                                                  stop_ids=stops)):
                        text = tok.decode([t for t in ids if t not in stops])
                        for stop in until:
                            text = text.split(stop)[0]
                        replies[i] = text
                    bar.update(len(chunk))
            bar.close()
            return replies

    return OurModel()


# English and Chinese cards: lm-eval task names, each with its random-guess score (1 / choices; GSM8K: 0)
CARD_TASKS = {"en": {"hellaswag": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "winogrande": 0.5,
                     "gsm8k": 0.0},
              "zh": {"ceval-valid": 0.25, "cmmlu": 0.25}}
LOCAL_TASK = "tinychat_sums"  # a multiple-choice task lm-eval builds from the built-in held-out problems (offline)
# published zero-shot accuracies (%) of a reference model on the same lm-eval tasks: minimind's 64M model, from its
# README (github.com/jingyaogong/minimind; it does not state the harness's version)
PUBLISHED = {"minimind 64M": {"ceval-valid": 24.89, "cmmlu": 25.38, "arc_easy": 28.49, "piqa": 50.65,
                              "hellaswag": 28.28}}


@dataclass
class EvalConfig:
    ckpt: str = "out/distill/best.pt"  # any checkpoint of this project: whole, imported, LoRA, NF4 base, int8
    tokenizer: str = ""                # empty: the one the checkpoint names
    language: str = "en"               # en | zh | both: which benchmarks the card runs (--tasks replaces them)
    tasks: str = ""                    # lm-eval task names, comma-separated (e.g. "arc_easy,piqa"); empty: the card
    limit: int = 0                     # at most this many items of each task (a quick card); 0: all
    num_fewshot: int = 0
    chat: bool = False                 # prompts rendered with the chat template (a chat model's card)
    batch_size: int = 16
    text_val: str = "data/pretrain_val.jsonl"  # held-out text: its perplexity (an lm-eval rolling task); empty: skip
    problems: str = "data/r1_val.jsonl"  # held-out problems: the multiple-choice task built from them and the
    # reasoning report; empty: skip
    eval_problems: int = 50
    max_new_tokens: int = 256
    out: str = ""                      # eval.json (and eval.md beside it); empty: beside the checkpoint
    device: str = "auto"
    dtype: str = "auto"


def local_tasks(folder: str, cfg: EvalConfig) -> list:
    """lm-eval task configs, written into `folder`, for what runs without the hub: the held-out text's perplexity
    and a multiple-choice sum task (the right total among four) built from the held-out problems' answers."""
    tasks = []
    if cfg.text_val and os.path.exists(cfg.text_val):
        write_task(folder, "tinychat_text", cfg.text_val, "loglikelihood_rolling", doc_to_text="",
                   doc_to_target="{{text}}", metric_list=[
                       {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                       {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}])
        tasks.append("tinychat_text")
    if cfg.problems and os.path.exists(cfg.problems):
        rows = []
        for conv in read_conversations(cfg.problems, verbose=False)[0]:
            answer = conv.extra.get("answer")
            if answer is not None and NUMBER.fullmatch(str(answer).replace(",", "")):
                n = int(float(str(answer).replace(",", "")))
                choices = [c for c in (n - 1, n + 1, n + 10, n + 2) if c >= 0][:3] + [n]  # (0 has no n - 1)
                choices.sort(key=lambda c: (c * 7919) % 13)  # a fixed order that does not put the answer last
                question = next(m["content"] for m in conv.messages if m["role"] == "user")
                rows.append({"question": question, "choices": [str(c) for c in choices], "label": choices.index(n)})
        path = os.path.join(folder, "sums.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        write_task(folder, LOCAL_TASK, path, "multiple_choice", doc_to_text="Question: {{question}}\nAnswer:",
                   doc_to_choice="{{choices}}", doc_to_target="{{label}}",
                   metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")])
        tasks.append(LOCAL_TASK)
    return tasks


def write_task(folder: str, name: str, data: str, output_type: str, **fields):
    """An lm-eval task config (YAML is a superset of JSON) reading a local jsonl file as its test split."""
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": os.path.abspath(data)}},
              "test_split": "test", "output_type": output_type, **fields}
    with open(os.path.join(folder, f"{name}.yaml"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def hub_reachable(host: str = "huggingface.co") -> bool:
    """Whether the Hugging Face hub answers (its benchmarks' data lives there), asked once with a short timeout."""
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def run_harness(lm, tasks: list, folder: str, cfg: EvalConfig) -> "tuple[dict, dict]":
    """({task: its metrics}, {task: why it was skipped}): each task run alone, so one the hub cannot serve (offline)
    or lm-eval does not know is a line in the card, not the end of it."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=folder)
    results, skipped = {}, {}
    for task in tqdm(tasks, desc="report card", unit="task"):
        if task not in manager.all_tasks:
            skipped[task] = "lm-eval has no such task"
            continue
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=cfg.limit or None,
                                          num_fewshot=cfg.num_fewshot or None, apply_chat_template=cfg.chat,
                                          verbosity="ERROR")
        except Exception as e:  # the hub unreachable (datasets raises several kinds), a dataset gone
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1"
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            skipped[task] = "offline, and not in the datasets cache" if offline else \
                f"could not load its data ({type(e).__name__}: {detail})"
            continue
        for name, metrics in out["results"].items():  # a group (C-Eval, CMMLU): its own line, not its subjects'
            if name == task or task not in out["results"]:
                results[name] = {k.split(",")[0]: v for k, v in metrics.items()
                                 if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    return results, skipped


def card_table(results: dict, skipped: dict, baselines: dict) -> str:
    """The card as a markdown table: each task's main metric, the random-guess score and published figures."""
    refs = list(PUBLISHED)
    lines = ["| task | metric | ours | random guess | " + " | ".join(refs) + " |",
             "|---|---|---|---|" + "---|" * len(refs)]
    for task, metrics in results.items():
        for metric in [m for m in ("acc", "acc_norm", "exact_match", "word_perplexity", "bits_per_byte")
                       if m in metrics][:2]:
            value = metrics[metric]
            shown = f"{value:.2f}" if "perplexity" in metric or "bits" in metric else f"{100 * value:.2f}"
            guess = f"{100 * baselines[task]:.2f}" if task in baselines and "acc" in metric else ""
            published = [f"{PUBLISHED[r][task]:.2f}" if task in PUBLISHED[r] and metric == "acc" else ""
                         for r in refs]
            lines.append(f"| {task} | {metric} | {shown} | {guess} | " + " | ".join(published) + " |")
    lines += [f"| {task} | skipped: {why} | | |" + " |" * len(refs) for task, why in skipped.items()]
    return "\n".join(lines)


def report_card(cfg: EvalConfig) -> dict:
    if cfg.language not in ("en", "zh", "both"):
        raise UserError(f"--language {cfg.language!r}: use en, zh or both")
    if not hub_reachable():  # datasets then reads its cache only, instead of retrying each task for 20 seconds
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("the report card runs lm-evaluation-harness: pip install lm-eval") from None
    device = choose_device(cfg.device)
    model, ckpt = load_checkpoint(cfg.ckpt, device)
    model = model.to(choose_dtype(device, cfg.dtype)).eval()
    tok = load_tokenizer(cfg.tokenizer or ckpt.get("tokenizer") or "data/tokenizer.model")
    baselines = {t: b for lang in (("en", "zh") if cfg.language == "both" else (cfg.language,))
                 for t, b in CARD_TASKS[lang].items()}
    baselines[LOCAL_TASK] = 0.25
    if cfg.tasks:
        baselines = {t.strip(): baselines.get(t.strip()) for t in cfg.tasks.split(",") if t.strip()}
    with tempfile.TemporaryDirectory() as folder:
        local = local_tasks(folder, cfg)  # (--tasks may name them too)
        tasks = list(baselines) if cfg.tasks else local + [t for t in baselines if t != LOCAL_TASK]
        results, skipped = run_harness(harness_model(model, tok, cfg.chat, cfg.batch_size), tasks, folder, cfg)
    card = {"checkpoint": cfg.ckpt, "results": results, "skipped": skipped,
            "random_guess": {t: b for t, b in baselines.items() if b is not None}, "published": PUBLISHED}
    if cfg.problems and os.path.exists(cfg.problems) and not cfg.tasks:
        card["reasoning"] = reasoning_report(model, tok, cfg.problems, cfg.eval_problems, cfg.max_new_tokens)
    table = card_table(results, skipped, card["random_guess"])
    out = cfg.out or os.path.join(os.path.dirname(cfg.ckpt) or ".", "eval.json")
    with atomic_write(out) as f:
        json.dump(card, f, indent=1, ensure_ascii=False)
    with atomic_write(out.removesuffix(".json") + ".md") as f:
        f.write(table + "\n")
    print(table)
    if "reasoning" in card:
        print(f"reasoning report: {describe(card['reasoning'])}")
    for why in dict.fromkeys(skipped.values()):
        print(f"skipped ({why}): " + ", ".join(t for t, w in skipped.items() if w == why))
    print(f"wrote {out} and {out.removesuffix('.json')}.md")
    return card


def main(argv=None):
    run_guarded(report_card, parse_config(EvalConfig, argv, description="The report card of a checkpoint: "
                "lm-evaluation-harness tasks, held-out perplexity and the reasoning report"), errors=(ModelError,))


if __name__ == "__main__":
    main()
