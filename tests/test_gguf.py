"""llama.cpp reads our export as we do. The GGUF that llama.cpp's own converter makes from a
`convert_hf.py --to_hf` folder marks the chat markers as control tokens and the think and tool tags as
user-defined ones, adds no space prefix, ends generation at <|im_end|> and carries our chat template (tools
included), which llama-cpp-python renders as we do; llama.cpp then tokenizes chat prompts to exactly our ids and
decodes greedily as our generate() does, a mixture of experts too (exported as Mixtral, which llama.cpp runs as
llama, and as Qwen2-MoE, its qwen2moe).

Needs llama.cpp: LLAMA_CPP_DIR, a llama.cpp source tree (its convert_hf_to_gguf.py and gguf-py), and
the llama_cpp package (llama-cpp-python) built from the same release; skipped without them. The
llama-cpp-python source distribution carries both:
  pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
  pip install ./llama_cpp_python-*.tar.gz
  LLAMA_CPP_DIR=$PWD/llama_cpp_python-*/vendor/llama.cpp python -m pytest tests/test_gguf.py
GGUF_CHECK_CKPT=out/distill/best.pt runs the greedy comparison on that checkpoint (and its tokenizer)
instead of a small random model.
"""
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import convert_hf
from conftest import spread_weights
from model import ModelConfig, Transformer, load_model
from offline_data import GENERATORS
from tokenizer import (CHAT_TEMPLATE_JINJA, EMPTY_THINK, SPECIAL_PIECES, TOOL_PIECES, encode_conversation,
                       load_tokenizer, render_prompt, render_text)

LLAMA_CPP_DIR = Path(os.environ.get("LLAMA_CPP_DIR", "/nonexistent"))
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama-cpp-python is not installed", allow_module_level=True)
if not (LLAMA_CPP_DIR / "convert_hf_to_gguf.py").is_file():
    pytest.skip("LLAMA_CPP_DIR does not point at a llama.cpp source tree", allow_module_level=True)
pytest.importorskip("safetensors")
pytestmark = pytest.mark.slow  # llama.cpp's converter and runtime in child processes

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf-py: TokenType)


# llama.cpp runs in a child process: loaded into the pytest process, its library aborted the whole run at
# interpreter exit (std::terminate, exit status 134) after every test had passed.
LLAMA_CPP_JOB = r"""
import json, sys
import numpy as np
import llama_cpp
job = json.load(sys.stdin)
if job["task"] == "tokenize":
    llm = llama_cpp.Llama(model_path=job["gguf"], vocab_only=True, verbose=False)
    out = {"eos": llm.token_eos(),
           "ids": [llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in job["texts"]]}
elif job["task"] == "chat":  # the GGUF's own template, rendered as llama-cpp-python's chat completions do, tokenized
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    llm = llama_cpp.Llama(model_path=job["gguf"], vocab_only=True, verbose=False)
    out = []
    for chat in job["chats"]:
        template = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="",
                                       add_generation_prompt=chat["add_generation_prompt"])
        text = template(messages=chat["messages"], tools=chat["tools"]).prompt
        out.append({"text": text, "ids": llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)})
else:  # greedy: f32 keys and values, as llama.cpp's default f16 cache alone moves the logits by about 1e-3
    llm = llama_cpp.Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_threads=2, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    out = []
    for prompt, n in job["prompts"]:
        llm.reset()
        llm.eval(prompt)
        tokens = []
        for _ in range(n):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        out.append({"tokens": tokens, "scores": llm.scores[:llm.n_tokens - 1].tolist()})
llm.close()
json.dump(out, sys.stdout)
"""


def llama_cpp_job(**job) -> dict:
    r = subprocess.run([sys.executable, "-c", LLAMA_CPP_JOB], input=json.dumps(job), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


# llama.cpp's Qwen2-MoE converter reads only a byte-level BPE tokenizer.json (GPT-2's, with a pre-tokenizer that it
# knows by hash, as Qwen's): for our SentencePiece tokenizer it gets the vocabulary reader of its dense Qwen2
# converter (tokenizer.model first). That is the one change; the weights go through the converter as they are.
QWEN2MOE_WITH_SENTENCEPIECE = r"""
import runpy, sys
from pathlib import Path
sys.argv = sys.argv[1:]  # the converter's own command line
sys.path[:0] = [str(Path(sys.argv[0]).parent), str(Path(sys.argv[0]).parent / "gguf-py")]
from conversion.qwen import Qwen2Model, Qwen2MoeModel
Qwen2MoeModel.set_vocab = Qwen2Model.set_vocab
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def to_gguf(hf_dir: Path, sentencepiece_qwen2moe: bool = False) -> Path:
    out = hf_dir / "model.gguf"
    converter = [str(LLAMA_CPP_DIR / "convert_hf_to_gguf.py")]
    if sentencepiece_qwen2moe:
        converter = ["-c", QWEN2MOE_WITH_SENTENCEPIECE, *converter]
    r = subprocess.run([sys.executable, *converter, str(hf_dir), "--outfile", str(out), "--outtype", "f32"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def exported(tokenizer_path, tmp_path_factory):
    """(our model, its tokenizer, the GGUF llama.cpp's converter made of our export)."""
    out = tmp_path_factory.mktemp("gguf")
    if os.environ.get("GGUF_CHECK_CKPT"):
        model, ckpt = load_model(os.environ["GGUF_CHECK_CKPT"])
        tokenizer_path = ckpt["tokenizer"]
    else:
        torch.manual_seed(0)
        model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=128))
        spread_weights(model, 0.2)
    convert_hf.save_hf(model.eval(), str(out), tokenizer_path)
    return model, load_tokenizer(tokenizer_path), to_gguf(out)


def gguf_fields(path: Path) -> dict:
    sys.path.insert(0, str(LLAMA_CPP_DIR / "gguf-py"))  # the gguf-py of the converter that wrote the file
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()}


def test_the_gguf_marks_special_pieces_has_no_space_prefix_and_ends_at_im_end(exported):
    _, tok, path = exported
    fields = gguf_fields(path)
    types = fields["tokenizer.ggml.token_type"]
    for name in ("im_start", "im_end"):
        assert types[tok.piece_id(SPECIAL_PIECES[name])] == CONTROL
    for name in ("think", "end_think", *TOOL_PIECES):  # single tokens, shown in the output
        i = tok.piece_id(SPECIAL_PIECES[name])
        assert (fields["tokenizer.ggml.tokens"][i], types[i]) == (SPECIAL_PIECES[name], USER_DEFINED)
    assert [types[i] for i in (tok.bos_id, tok.eos_id, tok.pad_id, tok.piece_id("<unk>"))] == [CONTROL] * 4  # as transformers
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.eos_token_id"] == tok.piece_id("<|im_end|>")
    assert fields["tokenizer.chat_template"] == CHAT_TEMPLATE_JINJA  # the tools block included


TOOLS = [{"type": "function", "function": {"name": "weather", "description": "今天的天气", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}]
TOOL_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in 北京?"},
             {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "北京"}}]},
             {"role": "tool", "content": '{"sky": "晴"}'}, {"role": "assistant", "content": EMPTY_THINK + "Sunny."}]


def test_llama_cpp_python_renders_the_ggufs_template_with_tools_to_our_ids(exported):
    """llama.cpp's C++ Jinja engine (llama-server's) is not in the bindings: llama-cpp-python renders the template it
    reads from the GGUF with jinja2, as transformers does, for its chat completions (tools= included)."""
    _, tok, path = exported
    chats = [(TOOL_CHAT, False), (TOOL_CHAT[:-1], True), (TOOL_CHAT[1:2], True)]
    theirs = llama_cpp_job(task="chat", gguf=str(path), chats=[
        {"messages": messages, "tools": TOOLS, "add_generation_prompt": generation_prompt}
        for messages, generation_prompt in chats])
    assert len(theirs) == len(chats)
    for (messages, generation_prompt), rendered in zip(chats, theirs):
        assert rendered["text"] == render_text(messages, generation_prompt, tools=TOOLS)
        assert rendered["ids"] == encode_conversation(tok, messages, generation_prompt, tools=TOOLS)[0]


def conversations(n: int) -> list:
    """n built-in chats and reasoning problems, English and Chinese, each with a generation prompt."""
    rng = random.Random(0)
    makers = [make for lang in ("en", "zh") for make in GENERATORS[lang][1:]]
    return [makers[k % len(makers)](rng)["conversations"] for k in range(n)]


def test_llama_cpp_tokenizes_chat_prompts_to_our_ids(exported):
    _, tok, path = exported
    prompts = [(messages, prompt) for messages in conversations(300)
               for prompt in (messages, messages[:1])]  # the whole chat, and its first turn with the generation prompt
    ours = [render_prompt(tok, prompt, add_generation_prompt=prompt is not messages) for messages, prompt in prompts]
    texts = [tok.decode(ids) for ids in ours]
    theirs = llama_cpp_job(task="tokenize", gguf=str(path), texts=texts)
    assert theirs["eos"] == tok.piece_id("<|im_end|>") and len(theirs["ids"]) == len(texts)
    for text, our_ids, their_ids in zip(texts, ours, theirs["ids"]):
        assert their_ids == our_ids, text[:200]


def test_llama_cpp_greedy_decoding_equals_ours(exported):
    model, tok, path = exported
    assert_llama_cpp_decodes_as_we_do(model, tok, path)


def assert_llama_cpp_decodes_as_we_do(model: Transformer, tok, path: Path):
    prompts = [render_prompt(tok, messages[:1]) for messages in conversations(4)]
    ours = [model.generate(prompt, max_new_tokens=min(32, model.cfg.max_seq_len - len(prompt)), temperature=0)
            for prompt in prompts]
    theirs = llama_cpp_job(task="greedy", gguf=str(path), n_ctx=model.cfg.max_seq_len,
                           prompts=[(prompt, len(tokens)) for prompt, tokens in zip(prompts, ours)])
    assert len(theirs) == len(prompts)
    for prompt, our_tokens, run in zip(prompts, ours, theirs):
        assert run["tokens"] == our_tokens
        np.testing.assert_allclose(np.array(run["scores"]), model(torch.tensor([prompt + our_tokens[:-1]]))[0][0]
                                   .detach().numpy(), atol=1e-4, rtol=0)  # the logits, position by position


# A mixture of each family llama.cpp runs (its architecture in the GGUF): Mixtral is its llama with experts;
# its qwen2moe needs the shared expert and adds the top k weights as they are (norm_topk_prob false)
MIXTURES = {"llama": dict(n_experts=4, n_experts_per_tok=2),
            "qwen2moe": dict(n_experts=4, n_experts_per_tok=2, n_shared_experts=1, shared_expert_gate=True,
                             norm_topk_prob=False)}


@pytest.mark.parametrize("arch", MIXTURES)
def test_llama_cpp_greedy_decoding_of_a_mixture_equals_ours(arch, tokenizer_path, tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, max_seq_len=128,
                                    moe_hidden_dim=64, **MIXTURES[arch]))
    spread_weights(model, 0.2)  # as in `exported` (the routers too: every expert is used)
    convert_hf.save_hf(model.eval(), str(tmp_path), tokenizer_path)
    path = to_gguf(tmp_path, sentencepiece_qwen2moe=arch == "qwen2moe")
    fields = gguf_fields(path)
    assert (fields["general.architecture"], fields[f"{arch}.expert_count"]) == (arch, 4)
    assert_llama_cpp_decodes_as_we_do(model, load_tokenizer(tokenizer_path), path)
