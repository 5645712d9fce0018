"""
Chat with a fine-tuned model in the terminal.

  python inference_sft.py                                   # out/distill/best.pt, interactive
  python inference_sft.py --ckpt out/sft/best.pt --system "You are terse."
  python inference_sft.py --prompt "What is 3 + 4?"         # one answer, then exit (for scripts)

Commands while chatting: /reset forgets the conversation, /exit quits (so do Ctrl-D and Ctrl-C).
The reasoning between <think> and </think> is shown dimmed with --show_think true (default)
and hidden with --show_think false; it is not kept in the history (only the answer is).
When the history outgrows the context, the oldest turns are dropped first.
"""
import sys
import time
from dataclasses import dataclass

import torch

from cli import UserError
from inference import Counted, LoadSettings, load_for_inference, run_script
from tokenizer import SPECIAL_PIECES, Tokenizer, render_prompt, reply_pieces, special_ids

DIM, RESET = "\033[2m", "\033[0m"
MARKERS = {"reasoning": SPECIAL_PIECES["think"], "answer": SPECIAL_PIECES["end_think"]}  # the piece starting each


@dataclass
class ChatConfig(LoadSettings):
    ckpt: str = "out/distill/best.pt"
    prompt: str = ""               # non-empty: answer this one message and exit
    system: str = ""               # optional system prompt
    show_think: bool = True        # show the reasoning (dimmed on a terminal) or hide it
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    seed: int = 0


class Chat:
    """A conversation with a model: the history, the prompt that fits the context, and the
    streamed answers (reasoning shown or hidden, never kept in the history)."""

    def __init__(self, cfg: ChatConfig, model, tok: Tokenizer, device="cpu"):
        self.cfg, self.model, self.tok = cfg, model, tok
        self.im_end = special_ids(tok)["im_end"]
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.history = []

    def reset(self):
        self.history = []

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
            ids = render_prompt(self.tok, system + turns, add_generation_prompt=True)
            if len(ids) <= budget or len(turns) == 1:
                break
            turns = turns[2:]  # one user message and its answer
        if len(ids) > budget:
            raise UserError(f"the message is {len(ids)} tokens with the template, more than the "
                            f"{budget} of the model's {ctx}-token context left for the conversation")
        self.history = turns[:-1]
        return ids

    def reply(self, user_message: str, out=sys.stdout) -> str:
        """Stream one answer to `out`; return the answer text without the reasoning."""
        c = self.cfg
        dim = out.isatty()
        t0 = time.perf_counter()
        tokens = Counted(self.model.generate_stream(
            self.prompt_ids(user_message), max_new_tokens=c.max_new_tokens, temperature=c.temperature,
            top_k=c.top_k, top_p=c.top_p, repetition_penalty=c.repetition_penalty,
            stop_ids=[self.im_end], generator=self.generator))
        answer, part = [], "answer"
        for part, text in reply_pieces(self.tok, tokens):
            if part == "answer":
                answer.append(text)
            if c.show_think and not text:  # a marker: <think> starts the dimmed reasoning, </think> ends it
                text = (DIM if dim and part == "reasoning" else "") + MARKERS[part] + \
                    (RESET if dim and part == "answer" else "")
            if part == "answer" or c.show_think:
                out.write(text)
                out.flush()
        out.write((RESET if dim and part == "reasoning" else "") + "\n")
        answer = "".join(answer).strip()
        self.history += [{"role": "user", "content": user_message}, {"role": "assistant", "content": answer}]
        self.last_speed = tokens.n / (time.perf_counter() - t0)
        return answer


def interactive(chat: Chat):
    print("chat: /reset forgets the conversation, /exit quits", file=sys.stderr)
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
        if message:
            try:
                chat.reply(message)
            except KeyboardInterrupt:  # stop this answer, keep chatting
                print()


def run(cfg: ChatConfig):
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
