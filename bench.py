"""
Speed measurements, printed as a table. Each row is one function below.

  python bench.py                    # the default model (dim 512, 8 layers, GQA): decode speed
  python bench.py --preset tiny      # a few seconds, to check that everything runs
  python bench.py --preset cpu       # the cpu training preset's shape
  python bench.py --preset 12gb      # the 12gb preset's shape, eager and compiled (on a GPU)
  python bench.py --hf false         # skip the transformers comparison (it is not installed)
  python bench.py --dtype bfloat16   # both in bf16 (fast on CPUs with AVX512-BF16 / AMX)

decode: batch-1 greedy generation of --new_tokens tokens after a --prompt_tokens prompt, with
our generate() (eager; compiled with --compile true; with int8 weights, quantize.py), with
transformers' LlamaForCausalLM.generate() of the same shape and with llama.cpp (llama-cpp-python) on the
same weights in f32 and q8_0 (random init: speed does not depend on the values). After a warm-up run,
the best of --repeats runs, rows taken in turns. Beside them the bound: batch-1 decoding reads every
weight and the keys and values once per token, so memory speed (a sum over 1 GiB, the same threads)
divided by those bytes is the most tokens/s this machine can give.
  python bench.py --preset smollm2-135m   # decode and serving rows only, at SmolLM2-135M's shape
llama.cpp rows need llama-cpp-python, LLAMA_CPP_DIR (a llama.cpp source tree: its converter, as .ci/run sets)
and a tokenizer for the export (--tokenizer); without them they are skipped with a note.
serve: --serve_streams N,M,...: that many greedy streams of --new_tokens at once through serve.py (eager,
continuous batching; needs --tokenizer) over HTTP, total tokens/s and the mean time to each stream's first token.
train: one optimizer step of --grad_accum micro-batches of --batch_size x --seq_len tokens (fp32
on CPU, bf16 autocast on CUDA), ours eager, ours compiled (--compile true) and transformers, with
MFU and peak memory (torch.cuda.max_memory_allocated on CUDA; on CPU the live tensor bytes).
memory: the same step of ours in bf16, run on fake tensors (shapes, no data, no arithmetic): the
peak a GPU would need, found on any machine in seconds, next to the training scripts' estimate.
  python bench.py --preset 12gb --memory_only true    # does the 12gb preset fit, without a GPU
  python bench.py --preset tinyllama-1.1b --memory_only true   # LoRA (train_sft.py --preset 12gb_lora) on it
--lora_rank N: the training and memory rows train LoRA adapters on a frozen base (lora.py), kept in
the compute dtype (with --base_quant nf4: in 4 bits, QLoRA); the presets named after Hugging Face models are
their shapes with the 12gb_lora settings (batch 4 x 1,024 tokens, activation checkpointing), the 7-8B ones
with an NF4 base (train_sft.py --preset 12gb_qlora).
  python bench.py --preset llama3.1-8b --memory_only true     # QLoRA on an 8B base, simulated
  python bench.py --preset cpu --lora_rank 16 --base_quant nf4 --decode_only false --hf false   # NF4 step speed
chat data (--sft_mb N, these rows only): --sft_mb MB of the offline generator's chats tokenized into
chat shards (dataset_sft.py) with --sft_workers processes, time and peak memory, then a second launch
that must reuse them; then SFT steps on --sft_spread_mb MB of chats with a realistic spread of lengths,
padded to the longest row against packed (--pack), in useful (conversation) tokens per second.
  python bench.py --preset cpu --sft_mb 200 --seq_len 1024 --max_seq_len 1024   # needs data/tokenizer.model
"""
import contextlib
import copy
import http.client
import importlib.util
import io
import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from cli import UserError, parse_config, run_guarded
from dataset_sft import SFTData, shard_dir_for
from lora import add_lora, cast_frozen, lora_params
from model import ModelConfig, ModelError, Transformer, compile_decoding, fuse_projections
from offline_data import english_chat
from quantize import Int8Linear, quantize_model
from runtime import Runtime, cap_memory, choose_device, choose_dtype, estimate_memory, peak_flops
from tokenizer import load_tokenizer


@dataclass
class BenchConfig:
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 4
    vocab_size: int = 6400
    hidden_dim: Optional[int] = field(default=None, metadata={"help": "SwiGLU width; unset: 8/3 * dim"})
    tie_embeddings: bool = True
    max_seq_len: int = 512
    n_experts: int = field(default=0, metadata={"help": "> 0: a mixture of this many experts in each layer"})
    n_experts_per_tok: int = 2
    moe_hidden_dim: Optional[int] = field(default=None, metadata={"help": "each expert's width; unset: hidden_dim"})
    prompt_tokens: int = 16
    new_tokens: int = 256
    repeats: int = field(default=3, metadata={
        "help": "timed runs per row, after one warm-up; the fastest counts (decode rows: taken in turns)"})
    hf: bool = field(default=True, metadata={"help": "also time transformers (needs it installed)"})
    device: str = field(default="auto", metadata={"help": "auto: cuda, else mps, else cpu (runtime.py's rule)"})
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 (or fp16) on CUDA and mps, fp32 on CPU"})
    seed: int = 0
    batch_size: int = field(default=8, metadata={"help": "training rows: sequences per step"})
    seq_len: int = field(default=256, metadata={"help": "training rows: tokens per sequence"})
    grad_accum: int = field(default=1, metadata={"help": "training rows: micro-batches per optimizer step"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "training rows: recompute activations"})
    lora_rank: int = field(default=0, metadata={"help": "training and memory rows: LoRA adapters of this rank on "
                                                        "the frozen model; 0: every weight trained"})
    base_quant: str = field(default="", metadata={"help": "with --lora_rank: nf4 holds the frozen base in 4 bits "
                                                          "(QLoRA); empty: in the compute dtype"})
    memory_only: bool = field(default=False, metadata={"help": "print only the simulated bf16 memory row"})
    compile: bool = field(default=False, metadata={"help": "also time a torch.compile'd training step and decode"})
    decode_only: bool = field(default=False, metadata={"help": "only the decode and serving rows"})
    llama_cpp: bool = field(default=True, metadata={
        "help": "decode rows: also llama.cpp on the same weights, f32 and q8_0 (skipped with a note without it)"})
    serve_streams: str = field(default="", metadata={
        "help": "serving rows: comma-separated numbers of concurrent streams, e.g. 1,4,8; empty: none"})
    peak_tflops: float = field(default=0.0, metadata={"help": "for MFU; 0: the GPU table / measured CPU matmuls"})
    memory_cap_gib: float = field(default=0.0, metadata={
        "help": "CUDA: use at most this much GPU memory, e.g. 12 to act as a 12 GB card; 0: all"})
    sft_mb: float = field(default=0.0, metadata={"help": "chat data rows only: MB of chats to build shards of; 0: skip"})
    sft_spread_mb: float = field(default=20.0, metadata={"help": "chat data rows: MB of chats for padded vs packed"})
    sft_steps: int = field(default=10, metadata={"help": "chat data rows: timed SFT steps, padded and packed"})
    sft_workers: int = field(default=0, metadata={"help": "chat data rows: tokenizer processes; 0: one per core"})
    tokenizer: str = field(default="data/tokenizer.model", metadata={"help": "chat data rows: the tokenizer"})


PRESETS = {
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=128,
                 prompt_tokens=8, new_tokens=32, repeats=1, batch_size=2, seq_len=64),
    "cpu": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, max_seq_len=256,
                prompt_tokens=16, new_tokens=64, repeats=1, batch_size=8, seq_len=256),
    "12gb": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=12000, max_seq_len=1024,
                 batch_size=8, seq_len=1024, grad_accum=8, compile=True),
}
PRESETS["cpu_moe"] = dict(PRESETS["cpu"], n_experts=8, moe_hidden_dim=352)  # as active as cpu's SwiGLU of 704
LORA_12GB = dict(lora_rank=16, batch_size=4, seq_len=1024, max_seq_len=2048, grad_checkpointing=True, hf=False)
PRESETS["smollm2-135m"] = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                               max_seq_len=2048, prompt_tokens=16, new_tokens=128, repeats=3, compile=True,
                               decode_only=True, serve_streams="1,4,8")
PRESETS.update({  # shapes of Hugging Face models that convert_hf.py imports, with train_sft.py's 12gb_lora settings
    "smollm2-360m": dict(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, hidden_dim=2560, vocab_size=49152,
                         **LORA_12GB),
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, vocab_size=32000,
                           tie_embeddings=False, **LORA_12GB),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                        **LORA_12GB),
    "smollm2-1.7b": dict(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, hidden_dim=8192, vocab_size=49152,
                         **LORA_12GB),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192, vocab_size=128256,
                        **LORA_12GB),
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=128256,
                        tie_embeddings=False, **LORA_12GB, base_quant="nf4"),
    "mistral-7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, vocab_size=32768,
                       tie_embeddings=False, **LORA_12GB, base_quant="nf4"),  # v0.3: the llama layout
})


class PeakMemory(TorchDispatchMode):
    """Counts the bytes of tensor storage made while it is active and still alive, and keeps
    the peak: what a piece of code allocates, on any device, fake tensors included."""

    def __init__(self):
        super().__init__()
        self.seen = WeakIdKeyDictionary()  # storages already counted (views share one)
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):  # (meta tensors and wrappers such as an NF4 tensor have no memory of their own)
            plain = isinstance(t, torch.Tensor) and not is_traceable_wrapper_subclass(t) and not t.is_meta
            storage = t.untyped_storage() if plain else None
            if storage is not None and storage not in self.seen:
                self.seen[storage] = True
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, storage.nbytes())
        return out

    def _free(self, nbytes):
        self.live -= nbytes


def peak_memory(make_step) -> int:
    """Peak bytes of making a training step (model, optimizer, batch) and running it twice
    (the second time with the optimizer's state)."""
    with PeakMemory() as meter:
        step = make_step()
        # From here: what the step keeps (model, batch) and makes. Building a LoRA model passes through its fp32
        # base, which the training scripts cast on the CPU before moving it to the GPU.
        meter.peak = meter.live
        step()
        step()
    return meter.peak


def simulated_peak(model_cfg: ModelConfig, cfg: BenchConfig, dtype=torch.bfloat16) -> int:
    """Peak bytes of our training step under autocast to `dtype`, on fake tensors. CPU autocast
    casts the same ops of this model (matmuls, attention) as CUDA autocast does."""
    with FakeTensorMode():
        return peak_memory(lambda: train_step_timer(model_cfg, cfg, "cpu", torch.autocast("cpu", dtype=dtype)))


def best_time(fn, repeats: int, device: str, warm_up: bool = True) -> float:
    """Seconds of the fastest of `repeats` calls of fn, after one untimed warm-up call."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def fastest_in_turns(timed: dict, rounds: int, device: str) -> dict:
    """{name: seconds of its fastest call} for {name: fn}, over `rounds` rounds that call every fn once in turn
    (after one untimed call each). On a machine whose speed drifts (a shared or throttling CPU) a slow spell then
    slows every row alike, so their ratios hold; timing one row after another would not."""
    for fn in timed.values():
        fn()
    best = dict.fromkeys(timed, float("inf"))
    for _ in range(rounds):
        for name, fn in timed.items():
            best[name] = min(best[name], best_time(fn, 1, device, warm_up=False))
    return best


def generation(model: Transformer, prompt: list, cfg: BenchConfig):
    """A call of our batch-1 greedy generate() of cfg.new_tokens tokens."""
    def run():
        out = model.generate(prompt, max_new_tokens=cfg.new_tokens, temperature=0)
        assert len(out) == cfg.new_tokens
    return run


def read_bandwidth(device: str) -> float:
    """Bytes per second this machine reads memory at, with the threads torch uses: the fastest of a few sums over
    1 GiB, larger than any cache."""
    data = torch.ones(256 * 1024 * 1024, device=device)  # 1 GiB of float32
    return data.numel() * 4 / best_time(lambda: data.sum(), 3, device)


def bytes_per_token(model: Transformer, length: int) -> int:
    """What batch-1 decoding reads for a token: every weight of the linear layers and the head (int8 ones with
    their scales) and the keys and values of a cache `length` positions long (the whole generation's)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    tensors = [t for m in layers for t in (m.weight, getattr(m, "scales", None)) if t is not None]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    c = model.cfg
    for moe in model.moe:  # a token reads only its own experts
        idle = sum(t.numel() * t.element_size() for t in moe.experts[0].parameters())
        weights -= (c.n_experts - c.n_experts_per_tok) * idle
    return weights + 2 * c.n_layers * c.n_kv_heads * c.head_dim * length * model.tok_embeddings.weight.element_size()


# llama.cpp in a child process (its library aborts at interpreter exit when loaded beside torch's): it loads the
# GGUFs, then for each name read from stdin decodes greedily as generate() does and answers "done".
LLAMA_CPP_TIMER = r"""
import json, sys
import numpy as np
import llama_cpp
job = json.loads(sys.stdin.readline())
models = {name: llama_cpp.Llama(model_path=path, n_ctx=job["n_ctx"], n_threads=job["threads"],
                                n_threads_batch=job["threads"], verbose=False) for name, path in job["gguf"].items()}
print("ready", flush=True)
for line in sys.stdin:
    llm = models[line.strip()]
    llm.reset()
    llm.eval(job["prompt"])
    for _ in range(job["new_tokens"] - 1):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    print("done", flush=True)
"""


def llama_cpp_missing(cfg: BenchConfig) -> Optional[str]:
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    if not os.path.isfile(os.path.join(os.environ.get("LLAMA_CPP_DIR", ""), "convert_hf_to_gguf.py")):
        return "LLAMA_CPP_DIR is not a llama.cpp source tree (its convert_hf_to_gguf.py)"
    if not os.path.isfile(cfg.tokenizer):
        return f"{cfg.tokenizer} is missing (llama.cpp's converter needs a tokenizer: --tokenizer)"
    return None


def llama_cpp_generations(model: Transformer, prompt: list, cfg: BenchConfig, folder: str) -> dict:
    """{row name: a call of llama.cpp's greedy decoding of cfg.new_tokens tokens} for our weights exported
    (convert_hf.py --to_hf) and converted by llama.cpp's own converter to f32 and q8_0."""
    ckpt, hf = save_for_tools(model, cfg, os.path.join(folder, "model.pt")), os.path.join(folder, "hf")
    here = os.path.dirname(os.path.abspath(__file__))
    commands = [[sys.executable, os.path.join(here, "convert_hf.py"), "--to_hf", ckpt, "--out", hf,
                 "--tokenizer", cfg.tokenizer]]
    gguf = {kind: os.path.join(folder, f"model_{kind}.gguf") for kind in ("f32", "q8_0")}
    commands += [[sys.executable, os.path.join(os.environ["LLAMA_CPP_DIR"], "convert_hf_to_gguf.py"), hf,
                  "--outfile", path, "--outtype", kind] for kind, path in gguf.items()]
    for command in commands:
        r = subprocess.run(command, capture_output=True, text=True)
        if r.returncode:
            raise UserError(f"{' '.join(command[1:3])} failed: {r.stderr.strip().splitlines()[-1]}")
    child = subprocess.Popen([sys.executable, "-c", LLAMA_CPP_TIMER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    weakref.finalize(child, child.kill)
    child.stdin.write(json.dumps({"gguf": gguf, "n_ctx": len(prompt) + cfg.new_tokens, "prompt": prompt,
                                  "threads": torch.get_num_threads(), "new_tokens": cfg.new_tokens}) + "\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "ready", "llama.cpp could not load the GGUFs"

    def generation_of(kind):
        def run():
            child.stdin.write(kind + "\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "done"
        return run
    return {f"decode, llama.cpp {kind}": generation_of(kind) for kind in gguf}


def decode_rows(model: Transformer, prompt: list, cfg: BenchConfig) -> list:
    """Decode speed eager and compiled (--compile), fp32 (or --dtype) and int8 weights, transformers' generate()
    and llama.cpp f32 / q8_0 on the same weights, all timed in turns; each next to the bound of its bytes per
    token, and ours next to llama.cpp at the same precision."""
    int8 = quantize_model(copy.deepcopy(model))
    timed, read = {}, {}
    bandwidth = read_bandwidth(cfg.device)
    for weights, m in (("", model), (", int8 weights", int8)):
        read[weights] = bytes_per_token(m, len(prompt) + cfg.new_tokens)
        timed[f"decode, ours{weights}"] = generation(m, prompt, cfg)
        if cfg.compile:
            t0 = time.perf_counter()
            compiled = compile_decoding(copy.deepcopy(m))
            compiled.generate(prompt, max_new_tokens=2, temperature=0)
            print(f"compiled the decode step{weights} in {time.perf_counter() - t0:.1f}s")
            timed[f"decode, ours compiled{weights}"] = generation(compiled, prompt, cfg)
    with_hf = cfg.hf and not model.moe  # (transformers_llama is a dense Llama)
    if with_hf:
        timed["decode, transformers"] = transformers_generation(model, prompt, cfg)
    with_llama_cpp = cfg.llama_cpp and cfg.device == "cpu"  # (llama-cpp-python's wheel here is a CPU build)
    missing = llama_cpp_missing(cfg) if with_llama_cpp else None
    with tempfile.TemporaryDirectory() as folder:
        if with_llama_cpp and not missing:
            timed.update(llama_cpp_generations(model, prompt, cfg, folder))
        seconds = fastest_in_turns(timed, cfg.repeats, cfg.device)
    speed = {name: cfg.new_tokens / s for name, s in seconds.items()}
    rows, bound = [], {weights: bandwidth / n for weights, n in read.items()}
    for weights, theirs in (("", "decode, llama.cpp f32"), (", int8 weights", "decode, llama.cpp q8_0")):
        for name in (f"decode, ours{weights}", f"decode, ours compiled{weights}", theirs):
            if name in speed:
                note = f"{speed[name] / bound[weights]:.0%} of the bound"
                if theirs in speed and name != theirs:
                    note += f", {speed[name] / speed[theirs]:.2f}x {theirs.removeprefix('decode, ')}"
                rows.append((name, speed[name], "tokens/s", note))
        rows.append((f"decode bound{weights}", bound[weights], "tokens/s",
                     f"memory read at {bandwidth / 1e9:.1f} GB/s / {read[weights] / 1e6:.0f} MB a token"))
    if with_hf:
        theirs = speed["decode, transformers"]
        fastest = max(v for name, v in speed.items() if name.startswith("decode, ours") and "int8" not in name)
        rows.append(("decode, transformers", theirs, "tokens/s",
                     f"our fastest (same weights) is {fastest / theirs:.2f}x"))
    if missing:
        print(f"note: no llama.cpp rows: {missing}")
    return rows


def save_for_tools(model: Transformer, cfg: BenchConfig, path: str) -> str:
    """The model in float32 (the model itself left in its dtype) as a checkpoint of this project that names
    --tokenizer, for convert_hf.py and serve.py."""
    state = {name: t.float() for name, t in model.state_dict().items()}
    torch.save({"model": state, "config": vars(model.cfg), "tokenizer": cfg.tokenizer}, path)
    return path


def serve_stream(port: int, prompt: str, cfg: BenchConfig, start: float, out: list):
    """One greedy streamed completion from serve.py: appends (seconds to its first token, tokens made)."""
    body = json.dumps({"prompt": prompt, "max_tokens": cfg.new_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    first, made = None, 0
    for line in connection.getresponse():
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if "error" in chunk:
            raise UserError(f"serve.py: {chunk['error']['message']}")
        if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
            first = time.perf_counter() - start
        made = (chunk.get("usage") or {}).get("completion_tokens", made)
    connection.close()
    out.append((first or 0.0, made))


def serving_rows(model: Transformer, cfg: BenchConfig, folder: str) -> list:
    """serve.py (eager, continuous batching) on the same weights over HTTP: N greedy streams of --new_tokens at
    once, for each N of --serve_streams, with their total tokens/s and the mean time to a stream's first token."""
    streams = [int(n) for n in cfg.serve_streams.split(",")]
    with socket.socket() as probe:  # a free port for the server
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    here = os.path.dirname(os.path.abspath(__file__))
    served = copy.deepcopy(model)
    with torch.no_grad():  # the head's rows past the tokenizer's pieces give 0: never picked, so always decodable
        served.output.weight[load_tokenizer(cfg.tokenizer).vocab_size:] = 0
    ckpt = save_for_tools(served, cfg, os.path.join(folder, "served.pt"))
    server = subprocess.Popen([sys.executable, os.path.join(here, "serve.py"), "--ckpt", ckpt, "--port", str(port),
                               "--batch_size", str(max(streams)), "--device", cfg.device],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows, alone = [], None
    try:
        for _ in range(600):  # until it answers
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/v1/models")
                break
            except OSError:
                time.sleep(0.2)
        serve_stream(port, "Warm up", cfg, time.perf_counter(), [])  # the server's first request pays its set-up
        for n in streams:
            out, start = [], time.perf_counter()
            threads = [threading.Thread(target=serve_stream, args=(port, f"Once upon a time {i}", cfg, start, out))
                       for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            total = sum(made for _, made in out) / (time.perf_counter() - start)
            alone = alone or total
            rows.append((f"serve, {n} stream{'s' if n > 1 else ''} at once", total, "tokens/s",
                         f"{total / alone:.2f}x one stream; first token after {sum(f for f, _ in out) / n:.2f} s"))
    finally:
        server.terminate()
        server.wait()
    return rows


def transformers_llama(model_cfg: ModelConfig):
    """transformers' LlamaForCausalLM of the same shape as ours, with its own random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model_cfg
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings))


def transformers_generation(model: Transformer, prompt: list, cfg: BenchConfig):
    """A call of transformers' greedy generate() of cfg.new_tokens tokens with a model of the same shape."""
    hf = transformers_llama(model.cfg).to(device=cfg.device, dtype=model.tok_embeddings.weight.dtype).eval()
    ids = torch.tensor([prompt], device=cfg.device)

    def run():
        with torch.no_grad():  # min_new_tokens: never stop early at an eos id
            out = hf.generate(ids, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens,
                              do_sample=False, pad_token_id=0)
        assert out.shape[1] == len(prompt) + cfg.new_tokens
    return run


def optimizer_step(model, loss_of, cfg: BenchConfig, device, autocast):
    """A function that runs one optimizer step of `model`: forward (loss_of()) and backward of
    each micro-batch, then AdamW on the weights it trains."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=torch.device(device).type == "cuda")

    def step():
        for _ in range(cfg.grad_accum):
            with autocast:
                loss = loss_of()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def train_step_timer(model_cfg: ModelConfig, cfg: BenchConfig, device, autocast, compiled: bool = False):
    """One optimizer step of our model (with --lora_rank: of its adapters, the frozen base in the compute dtype or
    in NF4)."""
    with torch.device(device):
        model = Transformer(model_cfg)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, 2.0 * cfg.lora_rank, base_quant=cfg.base_quant)
        cast_frozen(model, getattr(autocast, "fast_dtype", torch.float32))
    model.grad_checkpointing = cfg.grad_checkpointing
    step_model = torch.compile(model) if compiled else model
    x = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device=device)
    return optimizer_step(model, lambda: step_model(x[:, :-1], x[:, 1:])[1], cfg, device, autocast)


def train_transformers_timer(model_cfg: ModelConfig, cfg: BenchConfig, device, autocast):
    """The same training step with transformers' LlamaForCausalLM."""
    hf = transformers_llama(model_cfg).to(device)
    if cfg.grad_checkpointing:
        hf.gradient_checkpointing_enable()
    x = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, cfg.seq_len), device=device)
    return optimizer_step(hf, lambda: hf(input_ids=x, labels=x).loss, cfg, device, autocast)


def training_rows(model_cfg: ModelConfig, cfg: BenchConfig) -> list:
    """Training tokens/s, MFU and peak memory: ours eager, ours compiled, transformers."""
    rt = Runtime(cfg.device, "auto")
    peak = peak_flops(rt.device, cfg.peak_tflops)
    tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len
    flops = Transformer(model_cfg).flops_per_token(cfg.seq_len) * tokens
    ours = f"train, ours LoRA rank {cfg.lora_rank}" + (f", {cfg.base_quant} base" if cfg.base_quant else "") \
        if cfg.lora_rank else "train, ours"
    variants = [(ours, lambda: train_step_timer(model_cfg, cfg, rt.device, rt.autocast))]
    if cfg.lora_rank and cfg.base_quant:  # the same adapters on the base in the compute dtype, to compare
        plain = replace(cfg, base_quant="")
        variants.append((f"train, ours LoRA rank {cfg.lora_rank}, {str(rt.dtype).removeprefix('torch.')} base",
                         lambda: train_step_timer(model_cfg, plain, rt.device, rt.autocast)))
    if cfg.compile:
        variants.append(("train, ours compiled", lambda: train_step_timer(model_cfg, cfg, rt.device, rt.autocast, True)))
    if cfg.hf and not cfg.lora_rank and not model_cfg.n_experts:  # (transformers with PEFT would be the comparison
        # for LoRA, its Mixtral for a mixture: not timed here)
        variants.append(("train, transformers", lambda: train_transformers_timer(model_cfg, cfg, rt.device, rt.autocast)))
    rows = []
    for name, make in variants:
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = best_time(make(), cfg.repeats, cfg.device)
        memory = torch.cuda.max_memory_allocated() if rt.device.type == "cuda" else peak_memory(make)
        rows.append((name, tokens / seconds, "tokens/s", f"MFU {flops / seconds / peak:.1%}, "
                     f"peak memory {memory / 2**30:.2f} GiB"))
    print(f"training: {cfg.grad_accum} x {cfg.batch_size} x {cfg.seq_len} tokens per step, "
          f"{str(rt.dtype).removeprefix('torch.')}, peak {peak / 1e12:.2f} TFLOP/s for MFU")
    return rows


def memory_row(model_cfg: ModelConfig, cfg: BenchConfig) -> tuple:
    """Simulated bf16 peak of our training step, next to the training scripts' estimate."""
    adapters = lora_params(model_cfg, cfg.lora_rank) if cfg.lora_rank else 0
    estimate = sum(estimate_memory(model_cfg, cfg.batch_size, cfg.seq_len, torch.bfloat16, cfg.grad_checkpointing,
                                   adapters=adapters, base_quant=cfg.base_quant if adapters else "").values())
    name = "memory, bf16 step" + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "") + \
        (f", {cfg.base_quant} base" if cfg.lora_rank and cfg.base_quant else "")
    if model_cfg.n_experts:  # fake tensors have no values to route by
        return name, estimate / 2**30, "GiB", "the training scripts' estimate (a mixture of experts is not simulated)"
    simulated = simulated_peak(model_cfg, cfg)
    return (name, simulated / 2**30, "GiB", f"on fake tensors; the training scripts estimate "
            f"{estimate / 2**30:.2f} GiB ({estimate / simulated:.2f}x)")


# -----------------------------------------------------------------------------
# chat data at scale (--sft_mb): shards built once, and padded against packed SFT steps

def write_chats(path: str, n_bytes: int, spread: bool, seed: int = 0) -> int:
    """The offline generator's chats until about n_bytes. With spread, several chats are joined into one
    conversation of a length drawn from a log-normal (a few dozen to a few thousand tokens, as real chat
    data has) instead of the generator's short ones. Returns the number of conversations."""
    rng, size, n = random.Random(seed), 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < n_bytes:
            turns = english_chat(rng)["conversations"]
            if spread:
                target = min(8000, 80 * math.exp(rng.gauss(2.4, 1.0)))  # characters: ~4 per token
                while sum(len(t["content"]) for t in turns) < target:
                    turns += [t for t in english_chat(rng)["conversations"] if t["role"] != "system"]
            line = json.dumps({"conversations": turns}, ensure_ascii=False) + "\n"
            f.write(line)
            size, n = size + len(line.encode("utf-8")), n + 1
    return n


def process_tree_bytes(pid: int) -> int:
    """Memory of a process and its descendants (Linux): the sum of their proportional set sizes, so that
    pages the forked workers share with their parent are counted once. 0 where /proc cannot say."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents[int(entry)] = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        tree.update(children)
        frontier = children
    total = 0
    for p in tree:
        with contextlib.suppress(OSError):
            total += next(int(line.split()[1]) * 1024 for line in open(f"/proc/{p}/smaps_rollup")
                          if line.startswith("Pss:"))
    return total


def timed_with_peak_memory(command: list) -> tuple:
    """(seconds, peak bytes of the process tree sampled every 0.1 s, stdout) of a command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, process_tree_bytes(proc.pid) if os.path.isdir("/proc") else 0)
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    out = proc.stdout.read()
    if proc.returncode:
        raise UserError(f"{' '.join(command)} failed: {out.strip().splitlines()[-1:]}")
    return seconds, peak, out


def sft_step_rate(data, model_cfg: ModelConfig, cfg: BenchConfig, rt: Runtime) -> tuple:
    """(useful tokens/s, share of computed positions that are useful) of --sft_steps optimizer steps on
    `data` (optimizer_step: --grad_accum micro-batches, AdamW), after one warm-up step. Useful positions hold
    a conversation's token, not padding."""
    torch.manual_seed(cfg.seed)
    device = cfg.device
    model = Transformer(model_cfg).to(device)
    batches = (rt.to_device(data.batch(i)) for i in itertools.count())
    counted = []  # (useful, computed) positions of each micro-batch

    def loss_of():
        batch = next(batches)
        counted.append(((batch["tokens"] != data.pad_id).sum(), batch["tokens"].numel()))
        return model(**batch)[1]

    step = optimizer_step(model, loss_of, cfg, device, rt.autocast)
    step()  # warm-up
    counted.clear()
    t0 = time.perf_counter()
    for _ in range(cfg.sft_steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    useful, computed = sum(int(u) for u, _ in counted), sum(n for _, n in counted)
    return useful / seconds, useful / computed


def sft_rows(cfg: BenchConfig, dtype) -> list:
    workers = cfg.sft_workers or os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        chats = os.path.join(tmp, "chats.jsonl")
        n = write_chats(chats, int(cfg.sft_mb * 1e6), spread=False, seed=cfg.seed)
        build = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "dataset_sft.py"),
                 "--data", chats, "--tokenizer", cfg.tokenizer, "--num_workers", str(workers), "--show", "0"]
        seconds, peak, _ = timed_with_peak_memory(build)
        with open(os.path.join(shard_dir_for(chats), "info.json"), encoding="utf-8") as f:
            tokens = json.load(f)["tokens"]
        note = f"{cfg.sft_mb:g} MB, {n:,} conversations, {tokens / 1e6:.1f}M tokens, {workers} workers; " + \
            (f"peak memory {peak / 2**20:,.0f} MiB (all processes)" if peak else "peak memory: no /proc here")
        rows.append(("chat shards, build", seconds, "s", note))
        seconds, _, out = timed_with_peak_memory(build)
        reused = "tokenizing" not in out
        rows.append(("chat shards, second launch", seconds, "s",
                     "reused, nothing tokenized" if reused else "REBUILT: the shards were not reused"))

        spread = os.path.join(tmp, "spread.jsonl")
        write_chats(spread, int(cfg.sft_spread_mb * 1e6), spread=True, seed=cfg.seed)
        rt = Runtime(cfg.device, str(dtype).removeprefix("torch."))
        rates = {}
        for pack in (False, True):
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                data = SFTData(spread, cfg.tokenizer, cfg.seq_len, cfg.batch_size, seed=cfg.seed, pack=pack)
            model_cfg = ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                    n_kv_heads=cfg.n_kv_heads, vocab_size=data.vocab_size, max_seq_len=cfg.seq_len)
            rates[pack], share = sft_step_rate(data, model_cfg, cfg, rt)
            lengths = data.lengths - 1
            note = f"{share:.0%} of computed positions are conversation tokens" + ("" if pack else (
                f"; conversations {lengths.min()}-{lengths.max()} tokens, median {int(np.median(lengths))}"))
            if pack:
                note += f"; {rates[True] / rates[False]:.2f}x padded"
            rows.append((f"SFT step, {'packed' if pack else 'padded'}", rates[pack], "tokens/s", note))
    return rows


def print_table(rows):
    """rows: (name, value, unit, note) -> aligned text."""
    width = max(len(r[0]) for r in rows)
    for name, value, unit, note in rows:
        print(f"{name:<{width}}  {value:>10.{2 if unit == 'GiB' else 1}f} {unit:<8} {note}")


def run(cfg: BenchConfig):
    if cfg.prompt_tokens + cfg.new_tokens > cfg.max_seq_len:
        raise UserError(f"--prompt_tokens + --new_tokens ({cfg.prompt_tokens + cfg.new_tokens}) exceed "
                        f"--max_seq_len {cfg.max_seq_len}")
    device = choose_device(cfg.device)
    cfg.device, dtype = str(device), choose_dtype(device, cfg.dtype)
    if device.type == "cuda":
        cap_memory(device, cfg.memory_cap_gib)
    torch.manual_seed(cfg.seed)
    model_cfg = ModelConfig(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                            vocab_size=cfg.vocab_size, hidden_dim=cfg.hidden_dim, tie_embeddings=cfg.tie_embeddings,
                            max_seq_len=cfg.max_seq_len, n_experts=cfg.n_experts,
                            n_experts_per_tok=cfg.n_experts_per_tok, moe_hidden_dim=cfg.moe_hidden_dim)
    if cfg.memory_only:
        print_table([memory_row(model_cfg, cfg)])
        return
    if cfg.sft_mb:
        print_table(sft_rows(cfg, dtype))
        return
    model = Transformer(model_cfg).to(device=cfg.device, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (cfg.prompt_tokens,)).tolist()
    active = f" ({model.num_params(active=True) / 1e6:.1f}M active a token)" if model.moe else ""
    print(f"model: {model.num_params() / 1e6:.1f}M parameters{active}, {cfg.device}, "
          f"{str(model.tok_embeddings.weight.dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads; "
          f"decode: {cfg.prompt_tokens}-token prompt, {cfg.new_tokens} new tokens, greedy")
    rows = [] if cfg.decode_only else training_rows(model_cfg, cfg) + [memory_row(model_cfg, cfg)]
    print_table(rows + decode_rows(model, prompt, cfg))
    if cfg.serve_streams and not os.path.isfile(cfg.tokenizer):
        print(f"note: no serving rows: {cfg.tokenizer} is missing (serve.py needs a tokenizer: --tokenizer)")
    elif cfg.serve_streams:
        with tempfile.TemporaryDirectory() as folder:
            print_table(serving_rows(model, cfg, folder))


def main(argv=None):
    run_guarded(run, parse_config(BenchConfig, argv, presets=PRESETS, description=__doc__.strip().splitlines()[0]),
                errors=(ModelError,))


if __name__ == "__main__":
    main()
