"""
Chat with a fine-tuned model in the terminal.

  python inference_sft.py                                   # out/distill/best.pt, interactive
  python inference_sft.py --ckpt out/sft/best.pt --system "You are terse."
  python inference_sft.py --prompt "What is 3 + 4?"         # one answer, then exit (for scripts)
  python inference_sft.py --thinking off                   # answer without reasoning (on: always reason)
  python inference_sft.py --tools false                     # offer the model no tools

Commands while chatting: /reset forgets the conversation (and any /think or /no_think), /exit quits (so do Ctrl-D
and Ctrl-C). A message ending in /think or /no_think turns reasoning on or off for it and the messages after it
(Qwen3's soft switch; the tag is not sent to the model); /think or /no_think alone only switches.
The reasoning between <think> and </think> is shown dimmed with --show_think true (default)
and hidden with --show_think false; it is not kept in the history (only the answer is, after an
empty think block when the reply had one, as the training chats have it).

Tools (--tools true, the default): the prompt offers the functions in TOOLS (tools.py says how to add one). A reply
that calls them (<tool_call> blocks after its content, Qwen3's convention) has each call run, shown dimmed with its
result (→ calculator({"expression": "5 - 2"}), then ← 3), and the results go back to the model as tool messages; it
replies again, up to MAX_REPLIES times per message. A malformed call or a failing tool gives the model an "error: ..."
result, not a crash. The calls and results stay in the history (as Qwen3 keeps them), their reasoning dropped too.
When the history outgrows the context, the oldest exchanges (a message, and its calls, results and answer) are
dropped first.
"""
import json
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from cli import UserError
from inference import Counted, LoadSettings, load_for_inference, run_script
from tokenizer import (EMPTY_THINK, SPECIAL_PIECES, THINKING_PREFILL, Tokenizer, render_prompt, reply_pieces,
                       special_ids, split_reply, thinking_switch)
from tools import answer_call, calculator, tool_spec

# The functions the model may call, each under its own name (the one tool_spec gives it): add yours here.
TOOLS = {"calculator": calculator}
MAX_REPLIES = 4  # replies to one message: rounds of calls, then the answer (a model that keeps calling is stopped)
ANSWER_ROOM = 32  # tokens left for the answer to a tool's results ("Tom has 7 apples now.")

DIM, RESET = "\033[2m", "\033[0m"
MARKERS = {"reasoning": SPECIAL_PIECES["think"], "answer": SPECIAL_PIECES["end_think"]}  # the piece starting each
THINKING = {"auto": None, "on": True, "off": False}  # --thinking: the template's enable_thinking
# A think block, to the end of the text when a reply was cut off inside it: the reasoning the history leaves out
THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|\Z)", re.S)


@dataclass
class ChatConfig(LoadSettings):
    ckpt: str = "out/distill/best.pt"
    prompt: str = ""               # non-empty: answer this one message and exit
    system: str = ""               # optional system prompt
    show_think: bool = True        # show the reasoning (dimmed on a terminal) or hide it
    thinking: str = field(default="auto", metadata={
        "help": "auto: the model decides whether to reason; on: it always reasons; off: it answers at once (an "
                "empty think block follows the prompt, as Qwen3's enable_thinking=False); /think, /no_think switch"})
    tools: bool = True             # offer the TOOLS to the model (not when the tokenizer lacks the tool tags, or
                                   # their list leaves no room for a chat in the context)
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    seed: int = 0


def with_what_to_show(pieces, show_think: bool, dim: bool):
    """(part, text, what to write) for each of reply_pieces' (part, text): the answer, and with show_think the
    reasoning between its markers (dimmed on a terminal). A think block with no reasoning in it (a chat answered at
    once) shows nothing, nor do the blank lines after it: a block's opening is held back until it has reasoning.
    From the first tool call on nothing shows: Chat.run_calls shows each call with its result."""
    held, trim, calling = None, False, False  # held: what an open think block with nothing in it yet would have shown
    for part, text in pieces:
        calling |= part == "call"
        if calling:  # the calls end a reply (Qwen3's convention): what follows them is not part of the answer
            yield part, text, ""
            continue
        shown = text if part == "answer" or show_think else ""
        if show_think and not text:  # a marker: <think> starts the dimmed reasoning, </think> ends it
            shown = (DIM if dim and part == "reasoning" else "") + MARKERS[part] + \
                (RESET if dim and part == "answer" else "")
        if part == "reasoning" and (held is not None or not text):
            held = (held or "") + shown
            if not text.strip():
                yield part, text, ""
                continue
            shown, held = held, None  # the first reasoning: shown with the opening held back
        elif part == "answer" and held is not None:  # the block closes empty: it and the blank lines go
            held, trim, shown = None, True, ""
        elif trim:
            shown = shown.lstrip()
            trim = not shown
        yield part, text, shown


def space_held_back(shown_pieces):
    """with_what_to_show's pieces, blank space at the end of what they show held back until more text follows: the
    blank lines before a tool call, or at the end of a reply, are not written."""
    space = ""
    for part, text, shown in shown_pieces:
        shown = space + shown
        kept = shown.rstrip()
        space = shown[len(kept):]
        yield part, text, kept


def recorded(tokens, ids: list):
    """The token stream passed through unchanged, each token appended to ids as it goes."""
    for token in tokens:
        ids.append(token)
        yield token


def answer_of(text: str) -> str:
    """The answer in a reply's content: the text outside its think block, stripped."""
    return THINK_BLOCK.sub("", text).strip()


def without_reasoning(message: dict) -> dict:
    """A message of an exchange as the history keeps it once the exchange is answered: a call turn's think block
    emptied, as every trained chat turn has it (Qwen3 drops the reasoning of earlier exchanges too)."""
    if message["role"] != "assistant":
        return message
    return {**message, "content": THINK_BLOCK.sub(EMPTY_THINK.rstrip("\n"), message["content"], count=1)}


def without_oldest_exchange(history: list) -> list:
    """The history less its first exchange: the first user message and all up to the next one (its answer, and any
    calls and results before it)."""
    starts = [i for i, m in enumerate(history) if m["role"] == "user"]
    return history[starts[1]:] if len(starts) > 1 else []


class Chat:
    """A conversation with a model: the history, the prompt that fits the context, the streamed answers (reasoning
    shown or hidden, never kept in the history), and the tools it calls on the way. thinking: the template's
    enable_thinking for the next message, --thinking's until a message switches it."""

    def __init__(self, cfg: ChatConfig, model, tok: Tokenizer, device="cpu"):
        self.cfg, self.model, self.tok = cfg, model, tok
        self.im_end = special_ids(tok)["im_end"]
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        # Room for the answer, but never less than three quarters of the context for the conversation (the tool list
        # takes a third of a 256-token one): an answer that reaches the end of the context simply stops there.
        ctx = model.cfg.max_seq_len
        self.budget = max(ctx - cfg.max_new_tokens, ctx * 3 // 4)
        self.tools = self.offered_tools() if cfg.tools else {}
        self.specs = [tool_spec(fn) for fn in self.tools.values()]
        self.reset()

    def reset(self):
        self.history, self.thinking = [], THINKING[self.cfg.thinking]

    def offered_tools(self) -> dict:
        """TOOLS, unless the tokenizer lacks the tool tags (one from before them) or their list leaves no room for
        a conversation (a small model's context): then none, and a note says why."""
        if self.tok.chat_ids["tool_call"] is None:
            reason = f"{self.tok.path} has no {SPECIAL_PIECES['tool_call']} piece"
        else:
            listed = len(render_prompt(self.tok, self.system, tools=[tool_spec(fn) for fn in TOOLS.values()]))
            if listed < self.budget:
                return TOOLS
            reason = f"their list is {listed} tokens, more than the {self.budget} the context leaves for the chat"
        print(f"note: the chat goes on without tools: {reason}", file=sys.stderr)
        return {}

    def prompt_ids(self, exchange: list) -> list:
        """The rendered conversation: the history, then this exchange (the user's message, and the calls and results
        since), dropping the oldest exchanges until it leaves room for max_new_tokens in the model's context. Once
        the model has called a tool, the answer to the results needs only ANSWER_ROOM: the exchange may grow to that."""
        history = self.history
        budget = self.budget if len(exchange) == 1 else max(self.budget, self.model.cfg.max_seq_len - ANSWER_ROOM)
        while True:
            ids = render_prompt(self.tok, self.system + history + exchange, add_generation_prompt=True,
                                enable_thinking=self.thinking, tools=self.specs)
            if len(ids) <= budget or not history:
                break
            history = without_oldest_exchange(history)
        if len(ids) > budget:
            raise UserError(f"the message is {len(ids)} tokens with the template, more than the {budget} of "
                            f"the model's {self.model.cfg.max_seq_len}-token context left for the conversation"
                            + ("; --tools false leaves out the list of tools" if self.specs else ""))
        self.history = history
        return ids

    def reply(self, user_message: str, out=sys.stdout) -> str:
        """Stream the answer to one message to `out`, running the tools the model calls on the way; return the
        answer text without the reasoning. A trailing /think or /no_think sets thinking from this message on, and is
        cut from it."""
        user_message, switch = thinking_switch(user_message)
        if switch is not None:
            self.thinking = switch
        t0, self.generated = time.perf_counter(), 0
        exchange = [{"role": "user", "content": user_message}]
        for n in range(1, MAX_REPLIES + 1):
            text = self.stream_reply(exchange, out)
            content, calls = split_reply(text)
            if not (calls and self.tools) or n == MAX_REPLIES:  # a call when none is offered is not run: it ends
                break                                           # the reply, as a call does (with_what_to_show)
            exchange += self.run_calls(text, out)  # the reply with its calls, then their results
        if calls and self.tools:
            print(f"(the model still calls tools after {MAX_REPLIES} replies: stopped)", file=sys.stderr)
        answer = answer_of(content)
        # reasoning dropped; a reply that had a think block keeps it empty, as every trained chat turn has it
        kept = EMPTY_THINK + answer if SPECIAL_PIECES["think"] in content else answer
        self.history += [without_reasoning(m) for m in exchange] + [{"role": "assistant", "content": kept}]
        self.last_speed = self.generated / (time.perf_counter() - t0)
        return answer

    def stream_reply(self, exchange: list, out) -> str:
        """Stream the model's next reply to `out` (its calls left to run_calls) and return its text as the template
        has it: the thinking prefill included, <|im_end|> not."""
        c, dim, ids = self.cfg, out.isatty(), []
        tokens = Counted(self.model.generate_stream(
            self.prompt_ids(exchange), max_new_tokens=c.max_new_tokens, temperature=c.temperature,
            top_k=c.top_k, top_p=c.top_p, repetition_penalty=c.repetition_penalty,
            stop_ids=[self.im_end], generator=self.generator))
        part, wrote = "answer", False
        pieces = reply_pieces(self.tok, recorded(tokens, ids), in_think=self.thinking is True)
        for part, _, shown in space_held_back(with_what_to_show(pieces, c.show_think, dim)):
            out.write(shown)
            out.flush()
            wrote |= bool(shown)
        if wrote:  # a reply that is only calls wrote nothing: no empty line before them
            out.write((RESET if dim and part == "reasoning" else "") + "\n")
        self.generated += tokens.n
        return THINKING_PREFILL[self.thinking] + self.tok.decode([t for t in ids if t != self.im_end])

    def run_calls(self, text: str, out) -> list:
        """Run the calls in a reply's text, writing each dimmed with its result (→ the call, ← the result); return
        the messages they add to the exchange: the reply (its content and calls, or as written when a call is
        malformed, so that the model sees what it wrote beside the error), then each result as a tool message."""
        content, call_texts = split_reply(text)
        calls, results = [], []
        for call_text in call_texts:
            call, result = answer_call(call_text, self.tools)
            shown = f"{call['name']}({json.dumps(call['arguments'], ensure_ascii=False)})" if call else \
                call_text.strip()
            lines = f"→ {shown}\n← {result}"
            out.write((f"{DIM}{lines}{RESET}" if out.isatty() else lines) + "\n")
            out.flush()
            calls.append(call)
            results.append(result)
        turn = {"role": "assistant", "content": content, "tool_calls": calls} if None not in calls else \
            {"role": "assistant", "content": text}
        return [turn] + [{"role": "tool", "content": result} for result in results]


def interactive(chat: Chat):
    print("chat: /reset forgets the conversation, /exit quits; /think or /no_think at the end of a message turns "
          "reasoning on or off", file=sys.stderr)
    while True:
        try:
            message = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if message == "/exit":
            return
        if message == "/reset":
            chat.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        text, switch = thinking_switch(message)
        if switch is not None and not text:  # only the switch: nothing to answer yet
            chat.thinking = switch
            print(f"(reasoning {'on' if switch else 'off'} from the next message)", file=sys.stderr)
            continue
        if message:
            try:
                chat.reply(message)
            except KeyboardInterrupt:  # stop this answer, keep chatting
                print()


def run(cfg: ChatConfig):
    if cfg.thinking not in THINKING:  # before the model loads
        raise UserError(f"--thinking {cfg.thinking}: use auto, on or off")
    model, tok, device = load_for_inference(cfg)
    chat = Chat(cfg, model, tok, device)
    if cfg.prompt:
        chat.reply(cfg.prompt)
        print(f"({chat.last_speed:.1f} tokens/s)", file=sys.stderr)
    else:
        interactive(chat)


def main(argv=None):
    run_script(run, ChatConfig, __doc__, argv)


if __name__ == "__main__":
    main()
