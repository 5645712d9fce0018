"""
Chat with a fine-tuned model in the terminal.

  python inference_sft.py                                   # out/distill/best.pt, interactive
  python inference_sft.py --ckpt out/sft/best.pt --system "You are terse."
  python inference_sft.py --prompt "What is 3 + 4?"         # one answer, then exit (for scripts)
  python inference_sft.py --thinking off                   # answer without reasoning (on: always reason)

Commands while chatting: /reset forgets the conversation (and any /think or /no_think), /exit quits (so do Ctrl-D
and Ctrl-C). A message ending in /think or /no_think turns reasoning on or off for it and the messages after it
(Qwen3's soft switch; the tag is not sent to the model); /think or /no_think alone only switches.
The reasoning between <think> and </think> is shown dimmed with --show_think true (default)
and hidden with --show_think false; it is not kept in the history (only the answer is, after an
empty think block when the reply had one, as the training chats have it).
When the history outgrows the context, the oldest turns are dropped first.
"""
import sys
import time
from dataclasses import dataclass, field

import torch

from cli import UserError
from inference import Counted, LoadSettings, load_for_inference, run_script
from tokenizer import (EMPTY_THINK, SPECIAL_PIECES, Tokenizer, render_prompt, reply_pieces, special_ids,
                       thinking_switch)

DIM, RESET = "\033[2m", "\033[0m"
MARKERS = {"reasoning": SPECIAL_PIECES["think"], "answer": SPECIAL_PIECES["end_think"]}  # the piece starting each
THINKING = {"auto": None, "on": True, "off": False}  # --thinking: the template's enable_thinking


@dataclass
class ChatConfig(LoadSettings):
    ckpt: str = "out/distill/best.pt"
    prompt: str = ""               # non-empty: answer this one message and exit
    system: str = ""               # optional system prompt
    show_think: bool = True        # show the reasoning (dimmed on a terminal) or hide it
    thinking: str = field(default="auto", metadata={
        "help": "auto: the model decides whether to reason; on: it always reasons; off: it answers at once (an "
                "empty think block follows the prompt, as Qwen3's enable_thinking=False); /think, /no_think switch"})
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    seed: int = 0


def with_what_to_show(pieces, show_think: bool, dim: bool):
    """(part, text, what to write) for each of reply_pieces' (part, text): the answer, and with show_think the
    reasoning between its markers (dimmed on a terminal). A think block with no reasoning in it (a chat answered at
    once) shows nothing, nor do the blank lines after it: a block's opening is held back until it has reasoning."""
    held, trim = None, False  # held: what an open think block with nothing in it yet would have shown
    for part, text in pieces:
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


class Chat:
    """A conversation with a model: the history, the prompt that fits the context, and the
    streamed answers (reasoning shown or hidden, never kept in the history). thinking: the template's
    enable_thinking for the next message, --thinking's until a message switches it."""

    def __init__(self, cfg: ChatConfig, model, tok: Tokenizer, device="cpu"):
        self.cfg, self.model, self.tok = cfg, model, tok
        self.im_end = special_ids(tok)["im_end"]
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.reset()

    def reset(self):
        self.history, self.thinking = [], THINKING[self.cfg.thinking]

    def prompt_ids(self, user_message: str) -> list:
        """The rendered conversation plus the new message, dropping the oldest exchanges
        until it leaves room for max_new_tokens in the model's context."""
        system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
        # Room for the answer, but never less than half the context for the conversation:
        # an answer that reaches the end of the context simply stops there.
        ctx = self.model.cfg.max_seq_len
        budget = max(ctx - self.cfg.max_new_tokens, ctx // 2)
        turns = self.history + [{"role": "user", "content": user_message}]
        while True:
            ids = render_prompt(self.tok, system + turns, add_generation_prompt=True, enable_thinking=self.thinking)
            if len(ids) <= budget or len(turns) == 1:
                break
            turns = turns[2:]  # one user message and its answer
        if len(ids) > budget:
            raise UserError(f"the message is {len(ids)} tokens with the template, more than the "
                            f"{budget} of the model's {ctx}-token context left for the conversation")
        self.history = turns[:-1]
        return ids

    def reply(self, user_message: str, out=sys.stdout) -> str:
        """Stream one answer to `out`; return the answer text without the reasoning. A trailing /think or
        /no_think sets thinking from this message on, and is cut from it."""
        c = self.cfg
        dim = out.isatty()
        user_message, switch = thinking_switch(user_message)
        if switch is not None:
            self.thinking = switch
        t0 = time.perf_counter()
        tokens = Counted(self.model.generate_stream(
            self.prompt_ids(user_message), max_new_tokens=c.max_new_tokens, temperature=c.temperature,
            top_k=c.top_k, top_p=c.top_p, repetition_penalty=c.repetition_penalty,
            stop_ids=[self.im_end], generator=self.generator))
        answer, part, opened = [], "answer", self.thinking is not None  # the prompt opened a think block
        pieces = reply_pieces(self.tok, tokens, in_think=self.thinking is True)
        for part, text, shown in with_what_to_show(pieces, c.show_think, dim):
            opened |= part == "reasoning"
            if part == "answer":
                answer.append(text)
            out.write(shown)
            out.flush()
        out.write((RESET if dim and part == "reasoning" else "") + "\n")
        answer = "".join(answer).strip()
        # reasoning dropped; a reply that had a think block keeps it empty, as every trained chat turn has it
        kept = EMPTY_THINK + answer if opened else answer
        self.history += [{"role": "user", "content": user_message}, {"role": "assistant", "content": kept}]
        self.last_speed = tokens.n / (time.perf_counter() - t0)
        return answer


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
