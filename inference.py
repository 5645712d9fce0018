"""
Continue a text with a pretrained (base) model, printing tokens as they are generated.

  python inference.py --prompt "Once upon a time"
  echo "Once upon a time" | python inference.py --num_samples 3 --temperature 0.9
  python inference.py --ckpt out/pretrain/best.pt --prompt "The sea" --temperature 0   # greedy

Document start: dataset.py puts </s> after every document, so in pretraining every document
but the very first followed an </s>. A prompt is therefore encoded as </s> + its tokens, which
the model reads as "a new document starts here" (<s> never occurs in the data). This is the one
place that decides it: see prompt_ids().

Generation stops at </s> (the end of the document), after --max_new_tokens, or when the
context is full. The speed (tokens/s) goes to stderr, the text to stdout.

The loader the generation scripts share (inference_sft.py, serve.py) is here: load_for_inference() reads any
checkpoint of this project (evaluate.load_checkpoint: whole weights, LoRA adapters merged into their base, an NF4
base, int8), puts it on runtime.py's device in its dtype, quantized or compiled as asked, with its tokenizer; run_script() is
their main.
"""
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from cli import UserError, parse_config, run_guarded
from evaluate import load_checkpoint
from model import ModelError, compile_decoding, extend_context
from quantize import quantize_model
from runtime import COMPILES, choose_device, choose_dtype, warn_fallback
from tokenizer import StreamDecoder, Tokenizer, load_tokenizer


@dataclass
class LoadSettings:
    """How a checkpoint is loaded for generation: the fields inference.py, inference_sft.py and serve.py
    share (each script's own config extends it, with its own default checkpoint)."""
    ckpt: str = "out/pretrain/best.pt"
    tokenizer: str = field(default="", metadata={
        "help": "tokenizer.model or tokenizer.json (empty: the one the checkpoint names)"})
    max_seq_len: int = field(default=0, metadata={
        "help": "run to this many tokens, beyond the context it was trained at, with dynamic NTK RoPE scaling "
                "(untrained: quality falls past the trained length); 0: the trained context"})
    device: str = field(default="auto", metadata={"help": "auto: cuda, else mps (Apple Silicon), else cpu"})
    dtype: str = field(default="auto", metadata={
        "help": "auto: bfloat16 on CUDA and mps (float16 where it lacks it), float32 on CPU; or float32/bfloat16/float16"})
    quantize: str = field(default="none", metadata={
        "help": "int8: int8 weights for every linear layer (embedding and norms unchanged; quantize.py), fewer "
                "bytes read per token; none"})
    compile: bool = field(default=False, metadata={
        "help": "compile the decode step with torch.compile (CUDA graphs on a GPU): faster tokens after a "
                "compile of seconds to a minute when the model loads"})


@dataclass
class InferenceConfig(LoadSettings):
    prompt: Optional[str] = field(default=None, metadata={"help": "text to continue (not given: read stdin)"})
    max_new_tokens: int = 256
    temperature: float = field(default=0.8, metadata={"help": "0: greedy"})
    top_k: int = field(default=50, metadata={"help": "sample from the k likeliest tokens; 0: off"})
    top_p: float = field(default=0.95, metadata={"help": "sample from the likeliest tokens covering p; 1: off"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "> 1 discourages tokens already in the text (transformers' convention); 1: off"})
    num_samples: int = 1
    seed: int = 0


def prompt_ids(tok: Tokenizer, text: str) -> list:
    """The document-start token (</s>, see the module docstring) followed by the text's tokens."""
    return [tok.eos_id] + tok.encode(text)


class Counted:
    """A token stream passed through unchanged, counted as it goes: n tokens so far, the last one."""

    def __init__(self, tokens):
        self.tokens, self.n, self.last = tokens, 0, None

    def __iter__(self):
        for token in self.tokens:
            self.n, self.last = self.n + 1, token
            yield token


def stream_completion(model, tok: Tokenizer, ids: list, cfg: InferenceConfig, generator, out=sys.stdout) -> int:
    """Write the continuation of `ids` to `out` as it is generated, characters that span several
    byte tokens (Chinese, emoji) whole; return the number of tokens generated."""
    text, n = StreamDecoder(tok), 0
    for token in model.generate_stream(ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_k=cfg.top_k, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                                       stop_ids=[tok.eos_id], generator=generator):
        n += 1
        if token == tok.eos_id:
            break
        out.write(text.add(token))
        out.flush()
    out.write(text.rest() + "\n")
    out.flush()
    return n


def load_for_inference(settings: LoadSettings):
    """(model, tokenizer, device) for generation. The tokenizer is the one given, else the one
    the checkpoint was trained with; it is refused if its vocabulary does not fit the model. A
    max_seq_len beyond the trained context runs there with dynamic NTK scaling, and says so.
    quantize "int8": int8 weights for every linear layer (an int8 checkpoint from quantize.py
    loads as one whatever this says); compile: the decode step compiled, timed on stderr."""
    path, longer = settings.ckpt, settings.max_seq_len
    if settings.quantize not in ("none", "int8"):
        raise UserError(f"--quantize {settings.quantize}: use none or int8")
    device = choose_device(settings.device)
    dtype = choose_dtype(device, settings.dtype)
    model, ckpt = load_checkpoint(path, device)
    if longer > model.cfg.max_seq_len and ckpt.get("quantization"):
        raise UserError(f"{path} is quantized: extend the context of the float checkpoint it came from "
                        f"({ckpt.get('source', '?')}) with --quantize int8 instead")
    if longer > model.cfg.max_seq_len and settings.compile:
        raise UserError(f"--max_seq_len {longer} runs past the trained {model.cfg.max_seq_len} tokens with "
                        f"dynamic RoPE scaling, whose tables change with the length: it cannot be compiled; "
                        f"drop --compile or --max_seq_len")
    if longer > model.cfg.max_seq_len:
        print(f"note: running to {longer} tokens, beyond the {model.cfg.max_seq_len} the model was trained at, "
              f"with dynamic NTK RoPE scaling and no training for it: expect quality to fall past "
              f"{model.cfg.max_seq_len}", file=sys.stderr)
        model = extend_context(model, longer, "dynamic")
    model.to(dtype)
    if settings.quantize == "int8" and not ckpt.get("quantization"):
        quantize_model(model)
    if settings.compile and not COMPILES[device.type]:
        warn_fallback("--compile", f"torch.compile's {device.type} backend is a prototype in PyTorch")
    elif settings.compile:
        t0 = time.perf_counter()
        compile_decoding(model)
        model.generate([0], max_new_tokens=2, temperature=0)  # compiles now, not in the first answer
        print(f"compiled the decode step in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    tokenizer = settings.tokenizer or ckpt.get("tokenizer") or "data/tokenizer.model"
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"{tokenizer} has {tok.vocab_size} pieces but {path} was trained with "
                        f"vocab_size {model.cfg.vocab_size}: pass the tokenizer it was trained with")
    return model, tok, device


def run(cfg: InferenceConfig):
    model, tok, device = load_for_inference(cfg)
    dtype = model.tok_embeddings.weight.dtype
    text = cfg.prompt
    if text is None:
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
        text = sys.stdin.read().removesuffix("\n")
    ids = prompt_ids(tok, text)
    if len(ids) >= model.cfg.max_seq_len:
        raise UserError(f"the prompt is {len(ids)} tokens but the model's context (max_seq_len) is "
                        f"{model.cfg.max_seq_len}: shorten it")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    t0, n_tokens = time.perf_counter(), 0
    for i in range(cfg.num_samples):
        if i:
            print("---")
        sys.stdout.write(text)
        n_tokens += stream_completion(model, tok, ids, cfg, generator)
    seconds = time.perf_counter() - t0
    print(f"{n_tokens} tokens in {seconds:.2f}s: {n_tokens / seconds:.1f} tokens/s "
          f"({device}, {str(dtype).removeprefix('torch.')})", file=sys.stderr)


def run_script(run, config_class, doc: str, argv=None):
    """The main of a generation script (this one, inference_sft.py, serve.py): its flags parsed, and a bad
    checkpoint, prompt or flag reported in one line."""
    run_guarded(run, parse_config(config_class, argv, description=doc.strip().splitlines()[0]), errors=(ModelError,))


def main(argv=None):
    run_script(run, InferenceConfig, __doc__, argv)


if __name__ == "__main__":
    main()
