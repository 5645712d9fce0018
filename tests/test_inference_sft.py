"""inference_sft.Chat with a scripted model: reasoning kept out of the history, the history trimmed
to the context oldest first, /reset, the thinking switch (--thinking, /think, /no_think), the tokenizer taken
from the checkpoint, and tools: a call run, shown and its result fed back, a malformed call answered with an error,
--tools false."""
import builtins
import io
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest

import inference
import inference_sft
import tokenizer
from conftest import ROOT
from tokenizer import EMPTY_THINK, load_tokenizer, render_prompt, special_ids
from tools import calculator, tool_spec
from model import ModelConfig, Transformer, save_checkpoint


class ScriptedModel:
    """Stands in for the Transformer: answers with prepared token ids and records each prompt."""

    def __init__(self, replies, max_seq_len=512):
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.replies, self.prompts = list(replies), []

    def generate_stream(self, prompt, **kwargs):
        self.prompts.append(list(prompt))
        yield from self.replies.pop(0)


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def reply_ids(tok, answer, think=None):
    s = special_ids(tok)
    ids = [s["think"], *tok.encode(think), s["end_think"]] if think is not None else []
    return ids + tok.encode(answer) + [s["im_end"]]


def chat_with(tok, replies, max_seq_len=512, tools=False, **cfg):
    """A Chat with a ScriptedModel; without tools unless asked (their list alone is ~500 tokens of this small
    tokenizer)."""
    model = ScriptedModel(replies, max_seq_len)
    return inference_sft.Chat(inference_sft.ChatConfig(tools=tools, **cfg), model, tok), model


def test_reasoning_is_shown_or_hidden_and_never_kept_in_history(tok):
    for show in (True, False):
        chat, model = chat_with(tok, [reply_ids(tok, "It is 7.", think="I add 3 and 4."), reply_ids(tok, "Yes.")],
                                show_think=show)
        out = io.StringIO()
        assert chat.reply("What is 3 + 4?", out) == "It is 7."
        assert ("I add 3 and 4." in out.getvalue()) == show and "It is 7." in out.getvalue()
        assert chat.history == [{"role": "user", "content": "What is 3 + 4?"},
                                {"role": "assistant", "content": EMPTY_THINK + "It is 7."}]  # as chats train
        chat.reply("Sure?", io.StringIO())
        second_prompt = tok.decode(model.prompts[1])
        assert "It is 7." in second_prompt and "I add" not in second_prompt


def test_reasoning_is_dimmed_between_its_markers_on_a_terminal(tok):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    chat, _ = chat_with(tok, [reply_ids(tok, "It is 7.", think="I add 3 and 4.")])
    out = Terminal()
    chat.reply("What is 3 + 4?", out)
    dim, reset = inference_sft.DIM, inference_sft.RESET
    assert out.getvalue() == f"{dim}<think>I add 3 and 4.</think>{reset}It is 7.\n"


def test_reply_pieces_split_reasoning_from_answer_in_whole_characters(tok):
    """serve.py and Chat.reply share it: the markers as empty pieces, nothing after <|im_end|>, no half character."""
    def joined(pieces):
        pieces = list(pieces)
        return {part: "".join(t for p, t in pieces if p == part) for part in ("reasoning", "answer")}
    think, answer = "I add 3 and 4.", "Three 🍎."
    ids = reply_ids(tok, answer, think=think)
    assert len(tok.encode("🍎")) == 4  # one character, four byte tokens
    pieces = list(tokenizer.reply_pieces(tok, ids + tok.encode("not this")))
    assert [p for p in pieces if not p[1]] == [("reasoning", ""), ("answer", "")]
    assert joined(pieces) == {"reasoning": think, "answer": answer}
    assert not any("\ufffd" in text for _, text in pieces)
    plain = tokenizer.reply_pieces(tok, tok.encode("No markers."))
    assert joined(plain) == {"reasoning": "", "answer": "No markers."}
    tokens = inference.Counted(iter(ids))
    assert list(tokens) == ids and tokens.n == len(ids) and tokens.last == ids[-1]


def test_history_is_trimmed_to_the_context_oldest_exchange_first(tok):
    messages = [f"Message number {i} about the red ball in the park." for i in range(8)]
    chat, model = chat_with(tok, [reply_ids(tok, f"Answer {i}.") for i in range(8)], max_seq_len=160,
                            max_new_tokens=32)
    for m in messages:
        chat.reply(m, io.StringIO())
    budget = 160 - 32
    assert all(len(p) <= budget for p in model.prompts)
    last = tok.decode(model.prompts[-1])
    assert messages[-1] in last and messages[0] not in last
    kept = [i for i, m in enumerate(messages) if m in last]
    assert kept == list(range(kept[0], 8)) and len(kept) >= 2  # a contiguous run of the newest
    with pytest.raises(ValueError, match="tokens with the template"):
        chat.reply("word " * 200, io.StringIO())


def test_reset_forgets_the_conversation(tok, monkeypatch, capsys):
    chat, model = chat_with(tok, [reply_ids(tok, "Hi Tom."), reply_ids(tok, "Hello.")])
    typed = iter(["My name is Tom.", "/reset", "Who am I?", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    inference_sft.interactive(chat)
    assert "Tom" in tok.decode(model.prompts[0]) and "Tom" not in tok.decode(model.prompts[1])
    assert "(conversation cleared)" in capsys.readouterr().err


def test_thinking_off_prefills_an_empty_think_block_and_on_an_open_one(tok):
    user = [{"role": "user", "content": "What is 3 + 4?"}]
    chat, model = chat_with(tok, [reply_ids(tok, "It is 7.")], thinking="off")
    assert chat.reply("What is 3 + 4?", io.StringIO()) == "It is 7."
    assert model.prompts[0] == render_prompt(tok, user, enable_thinking=False)
    assert tok.decode(model.prompts[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat.history[-1] == {"role": "assistant", "content": EMPTY_THINK + "It is 7."}

    s = special_ids(tok)  # on: the model goes on from the open block, its reasoning shown as reasoning
    chat, model = chat_with(tok, [[*tok.encode("I add 3 and 4."), s["end_think"], *reply_ids(tok, "It is 7.")]],
                            thinking="on")
    out = io.StringIO()
    assert chat.reply("What is 3 + 4?", out) == "It is 7."
    assert model.prompts[0] == render_prompt(tok, user, enable_thinking=True)
    assert out.getvalue() == "<think>I add 3 and 4.</think>It is 7.\n"
    assert chat.history[-1] == {"role": "assistant", "content": EMPTY_THINK + "It is 7."}


def test_a_reply_without_a_think_block_is_kept_as_it_is(tok):
    chat, _ = chat_with(tok, [reply_ids(tok, "Hello.")])  # auto: the model chose not to open one
    chat.reply("Hi", io.StringIO())
    assert chat.history[-1] == {"role": "assistant", "content": "Hello."}


def test_think_and_no_think_switch_this_message_and_the_next_ones(tok, monkeypatch, capsys):
    s = special_ids(tok)
    reasoned = [*tok.encode("I add."), s["end_think"], *reply_ids(tok, "7.")]
    chat, model = chat_with(tok, [reply_ids(tok, "Hi."), reasoned, reasoned, reply_ids(tok, "Bye.")])
    typed = iter(["Hello /no_think", "/think", "What is 3 + 4?", "And 4 + 3?", "/reset", "Bye", "/exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(typed))
    inference_sft.interactive(chat)
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": EMPTY_THINK + "Hi."}]
    assert model.prompts[0] == render_prompt(tok, history[:1], enable_thinking=False)  # the tag cut
    history += [{"role": "user", "content": "What is 3 + 4?"}]
    assert model.prompts[1] == render_prompt(tok, history, enable_thinking=True)  # "/think" alone asked nothing
    history += [{"role": "assistant", "content": EMPTY_THINK + "7."}, {"role": "user", "content": "And 4 + 3?"}]
    assert model.prompts[2] == render_prompt(tok, history, enable_thinking=True)  # it holds
    assert model.prompts[3] == render_prompt(tok, [{"role": "user", "content": "Bye"}])  # /reset: --thinking's auto
    assert len(model.prompts) == 4 and "(reasoning on from the next message)" in capsys.readouterr().err

    chat, model = chat_with(tok, [reply_ids(tok, "7.")], thinking="on")  # --prompt's one message switches too
    chat.reply("What is 3 + 4? /no_think", io.StringIO())
    assert model.prompts[0] == render_prompt(tok, [{"role": "user", "content": "What is 3 + 4?"}],
                                             enable_thinking=False)


def test_a_thinking_setting_other_than_auto_on_off_is_refused_before_loading():
    with pytest.raises(ValueError, match="--thinking yes: use auto, on or off"):
        inference_sft.run(inference_sft.ChatConfig(ckpt="no/such.pt", thinking="yes"))


@pytest.mark.slow
def test_default_tokenizer_is_the_checkpoints_and_must_fit_the_model(tokenizer_path, tmp_path):
    """The checkpoint names its tokenizer, which lies elsewhere than data/tokenizer.model."""
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=64, max_seq_len=64)
    good, small = tmp_path / "good.pt", tmp_path / "small.pt"
    save_checkpoint({"model": Transformer(cfg).state_dict(), "config": asdict(cfg), "tokenizer": tokenizer_path},
                    str(good))
    cfg.vocab_size = 256
    save_checkpoint({"model": Transformer(cfg).state_dict(), "config": asdict(cfg), "tokenizer": tokenizer_path},
                    str(small))

    def chat(ckpt):
        return subprocess.run([sys.executable, str(ROOT / "inference_sft.py"), "--ckpt", str(ckpt), "--prompt", "Hi",
                               "--max_new_tokens", "4"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    r = chat(good)
    assert r.returncode == 0, r.stderr
    r = chat(small)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {tokenizer_path} has 512 pieces but {small} was trained with vocab_size 256: "
        f"pass the tokenizer it was trained with"]


def test_an_empty_think_block_shows_nothing_but_stays_in_the_history(tok):
    """A chat answered at once opens with an empty block (as every built-in chat reply does): the terminal shows
    the answer alone, without the markers or the blank lines, on a terminal too; the history keeps the block."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    for out in (io.StringIO(), Terminal()):
        chat, _ = chat_with(tok, [reply_ids(tok, "\n\nHello!", think="\n\n")])
        assert chat.reply("Hi!", out) == "Hello!"
        assert out.getvalue() == "Hello!\n"
        assert chat.history[-1] == {"role": "assistant", "content": EMPTY_THINK + "Hello!"}


# -----------------------------------------------------------------------------
# tools

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "5 - 2"}}\n</tool_call>'
RESULT = "<tool_response>\n3\n</tool_response>"
QUESTION = "Lily has 5 pencils and gives 2 away. How many does she have now?"
ANSWER = "Lily has 3 pencils now."


class CallingModel(ScriptedModel):
    """Stands in for a model trained on tool chats: it replies `call` until the last user turn of its prompt (where
    the results are) holds `result`, then `answer`; each prompt recorded."""

    def __init__(self, tok, call, result=RESULT, answer=EMPTY_THINK + ANSWER, max_seq_len=2048):
        super().__init__([], max_seq_len)
        self.tok, self.call, self.result, self.answer = tok, call, result, answer

    def generate_stream(self, prompt, **kwargs):
        self.prompts.append(list(prompt))
        last_turn = self.tok.decode(prompt).rsplit("<|im_start|>user\n", 1)[-1]
        text = self.answer if self.result in last_turn else self.call
        yield from self.tok.encode(text) + [special_ids(self.tok)["im_end"]]


def chat_calling(tok, call, result=RESULT, max_seq_len=2048, **cfg):
    model = CallingModel(tok, call, result, max_seq_len=max_seq_len)
    return inference_sft.Chat(inference_sft.ChatConfig(**cfg), model, tok), model


def test_a_call_is_run_shown_and_its_result_fed_back_to_the_model(tok):
    reasoning = "<think>\nLily had 5 and gave 2 away.\n</think>\n\n"
    chat, model = chat_calling(tok, reasoning + CALL)
    out = io.StringIO()
    assert chat.reply(QUESTION, out) == ANSWER
    assert out.getvalue() == (f"<think>\nLily had 5 and gave 2 away.\n</think>\n"
                              f'→ calculator({{"expression": "5 - 2"}})\n← 3\n{ANSWER}\n')
    first, second = (tok.decode(p) for p in model.prompts)
    assert '"name": "calculator", "description": "Work out an arithmetic expression."' in first
    assert second.startswith(first)  # then the call turn as generated, and the result
    assert second.endswith(f"{reasoning}{CALL}<|im_end|>\n<|im_start|>user\n{RESULT}<|im_end|>\n"
                           f"<|im_start|>assistant\n")
    call = {"name": "calculator", "arguments": {"expression": "5 - 2"}}
    assert chat.history == [  # the calls and results kept, the reasoning of every turn dropped
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "<think>\n\n</think>\n", "tool_calls": [call]},
        {"role": "tool", "content": "3"},
        {"role": "assistant", "content": EMPTY_THINK + ANSWER}]
    chat.reply("And now?", io.StringIO())
    assert f"<think>\n\n</think>\n\n{CALL}<|im_end|>\n<|im_start|>user\n{RESULT}" in tok.decode(model.prompts[2])


def test_calls_and_results_are_dimmed_on_a_terminal(tok):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    chat, _ = chat_calling(tok, CALL, show_think=False)
    out = Terminal()
    chat.reply(QUESTION, out)
    dim, reset = inference_sft.DIM, inference_sft.RESET
    assert out.getvalue() == f'{dim}→ calculator({{"expression": "5 - 2"}})\n← 3{reset}\n{ANSWER}\n'


def test_a_malformed_call_or_a_failing_tool_gives_the_model_an_error(tok):
    bad = '<tool_call>\n{"name": "calculator", "arguments": {"expression": 5 - 2}}\n</tool_call>'
    failing = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "5 / 0"}}\n</tool_call>'
    chat, model = chat_calling(tok, f"{bad}\n{failing}", result="division by zero")
    out = io.StringIO()
    assert chat.reply(QUESTION, out) == ANSWER
    assert out.getvalue().startswith(f'→ {bad[12:-13]}\n← error: the call is not valid JSON: ')
    assert '→ calculator({"expression": "5 / 0"})\n← error: division by zero\n' in out.getvalue()
    second = tok.decode(model.prompts[1])
    assert f"{bad}\n{failing}<|im_end|>\n<|im_start|>user\n<tool_response>\nerror: the call is not valid JSON" \
        in second  # the calls kept as written, beside their errors
    assert "</tool_response>\n<tool_response>\nerror: division by zero\n</tool_response><|im_end|>" in second


def test_a_model_that_keeps_calling_is_stopped(tok, capsys):
    chat, model = chat_calling(tok, "I will check." + CALL, result="never")
    assert chat.reply(QUESTION, io.StringIO()) == "I will check."
    assert len(model.prompts) == inference_sft.MAX_REPLIES
    assert f"still calls tools after {inference_sft.MAX_REPLIES} replies" in capsys.readouterr().err


def test_tools_false_a_small_context_or_a_tokenizer_without_the_tags_renders_no_tools(tok, monkeypatch, capsys):
    user = [{"role": "user", "content": QUESTION}]
    chat, model = chat_calling(tok, EMPTY_THINK + ANSWER)
    chat.reply(QUESTION, io.StringIO())
    assert model.prompts[0] == render_prompt(tok, user, tools=[tool_spec(calculator)])
    chat, model = chat_calling(tok, EMPTY_THINK + ANSWER, tools=False)
    chat.reply(QUESTION, io.StringIO())
    assert model.prompts[0] == render_prompt(tok, user) and "<tools>" not in tok.decode(model.prompts[0])
    assert capsys.readouterr().err == ""
    chat, model = chat_calling(tok, CALL, tools=False)  # a call when none is offered: not run, it ends the reply
    assert chat.reply(QUESTION, io.StringIO()) == "" and len(model.prompts) == 1
    assert chat.history == [user[0], {"role": "assistant", "content": ""}]

    chat, model = chat_with(tok, [reply_ids(tok, ANSWER)], max_seq_len=256, tools=True)  # a small context
    chat.reply(QUESTION, io.StringIO())
    assert model.prompts[0] == render_prompt(tok, user)
    assert "note: the chat goes on without tools: their list is" in capsys.readouterr().err

    monkeypatch.setitem(tok.chat_ids, "tool_call", None)  # a tokenizer from before the tool tags
    chat, model = chat_calling(tok, EMPTY_THINK + ANSWER)
    chat.reply(QUESTION, io.StringIO())
    assert model.prompts[0] == render_prompt(tok, user)
    assert f"the chat goes on without tools: {tok.path} has no <tool_call> piece" in capsys.readouterr().err


def test_trimming_the_history_drops_whole_exchanges_with_their_calls(tok):
    user = [{"role": "user", "content": QUESTION}]  # room for the tools, the message and about two exchanges
    ctx = len(render_prompt(tok, user, tools=[tool_spec(calculator)])) + 64 + 350
    chat, model = chat_calling(tok, CALL, max_seq_len=ctx, max_new_tokens=64)
    for i in range(6):
        chat.reply(f"{QUESTION} ({i})", io.StringIO())
        roles = [m["role"] for m in chat.history]
        assert roles == ["user", "assistant", "tool", "assistant"] * (len(roles) // 4)
    assert all(len(p) <= ctx - 64 for p in model.prompts)
    assert len(model.prompts) == 12 and len(chat.history) >= 8  # every message called; two exchanges kept or more
    assert chat.history[0]["content"] != f"{QUESTION} (0)" and chat.history[-4]["content"] == f"{QUESTION} (5)"
