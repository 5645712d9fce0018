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
from dataclasses import dataclass, field

import torch

from cli import UserError, parse_config, run_guarded
from dataset_sft import render_prompt
from inference import load_for_inference
from model import ModelError
from tokenizer import StreamDecoder, Tokenizer, special_ids

DIM, RESET = "\033[2m", "\033[0m"


@dataclass
class ChatConfig:
    ckpt: str = "out/distill/best.pt"
    tokenizer: str = field(default="", metadata={
        "help": "tokenizer.model or tokenizer.json (empty: the one the checkpoint names)"})
    prompt: str = ""               # non-empty: answer this one message and exit
    system: str = ""               # optional system prompt
    show_think: bool = True        # show the reasoning (dimmed on a terminal) or hide it
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    repetition_penalty: float = 1.05
    max_seq_len: int = field(default=0, metadata={
        "help": "run to this many tokens, beyond the context it was trained at, with dynamic NTK RoPE scaling "
                "(untrained: quality falls past the trained length); 0: the trained context"})
    seed: int = 0
    device: str = "auto"


class Chat:
    """A conversation with a model: the history, the prompt that fits the context, and the
    streamed answers (reasoning shown or hidden, never kept in the history)."""

    def __init__(self, cfg: ChatConfig, model, tok: Tokenizer, device="cpu"):
        self.cfg, self.model, self.tok = cfg, model, tok
        ids = special_ids(tok)
        self.im_end, self.think, self.end_think = ids["im_end"], ids["think"], ids["end_think"]
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
        segments = {"think": StreamDecoder(self.tok), "answer": StreamDecoder(self.tok)}
        part = "answer"
        t0, n = time.perf_counter(), 0
        for token in self.model.generate_stream(
                self.prompt_ids(user_message), max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                top_k=c.top_k, top_p=c.top_p, repetition_penalty=c.repetition_penalty,
                stop_ids=[self.im_end], generator=self.generator):
            n += 1
            if token == self.im_end:
                break
            if token in (self.think, self.end_think):
                if part == "think" and c.show_think:
                    out.write(segments["think"].rest())
                part = "think" if token == self.think else "answer"
                if c.show_think:
                    out.write((DIM if dim and part == "think" else "") + self.tok.decode([token]) +
                              (RESET if dim and part == "answer" else ""))
                continue
            new_text = segments[part].add(token)
            if part == "answer" or c.show_think:
                out.write(new_text)
                out.flush()
        if part == "answer" or c.show_think:
            out.write(segments[part].rest())
        out.write((RESET if dim and part == "think" else "") + "\n")
        answer = segments["answer"].text().strip()
        self.history += [{"role": "user", "content": user_message}, {"role": "assistant", "content": answer}]
        self.last_speed = n / (time.perf_counter() - t0)
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
    model, tok, device = load_for_inference(cfg.ckpt, cfg.tokenizer, cfg.device, "auto", cfg.max_seq_len)
    chat = Chat(cfg, model, tok, device)
    if cfg.prompt:
        chat.reply(cfg.prompt)
        print(f"({chat.last_speed:.1f} tokens/s)", file=sys.stderr)
    else:
        interactive(chat)


def main(argv=None):
    run_guarded(run, parse_config(ChatConfig, argv, description=__doc__.strip().splitlines()[0]),
                errors=(ModelError,))


if __name__ == "__main__":
    main()
