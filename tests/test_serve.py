"""serve.py live on 127.0.0.1, through the official openai client and raw HTTP: chat (reasoning apart from the answer,
streamed and not), tool calls and their results, completions, models, stop strings, seeds, errors, a client that goes
away, concurrent requests decoded in one batch (each as it would be alone), those past the batch in turn; and its API
without HTTP, request bodies in and OpenAI's dicts out, the thinking switch (chat_template_kwargs, /think) and
tool_choice included."""
import copy
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import closing, contextmanager
from dataclasses import asdict
from types import SimpleNamespace

import openai
import pytest
import torch

import serve
from cli import UserError
from conftest import ROOT, spread_weights
from tokenizer import render_prompt
from inference import LoadSettings, load_for_inference, prompt_ids
from model import ModelConfig, Transformer, save_checkpoint
from tokenizer import EMPTY_THINK, TOOL_PIECES, call_text, load_tokenizer, special_ids

KEY = "test-key"
TINY = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=64, max_seq_len=64)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
WEATHER = {"name": "get_weather", "arguments": {"city": "Paris"}}  # a call of TOOLS[0]
QUESTION = {"role": "user", "content": "What is the weather in Paris?"}


class ScriptedModel:
    """Stands in for the Transformer in serve.py's batch: each row of the KV cache replies to its prompt with prepared
    token ids (`reply`, or `reply(prompt)` where it is a function), then a filler token for as long as it is allowed
    (logits with all their weight on that token), one forward every `delay` seconds. Records the prompts, the tokens
    each was given, the most rows in use in one decode step, and the threads it ran on; with `fail` set, every forward
    raises."""
    compiled_decoding = False

    def __init__(self, reply, filler, max_seq_len=4096, delay=0.0):
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len, vocab_size=512, rope_scaling=None)
        self.reply, self.filler, self.delay = reply, filler, delay
        self.prompts, self.yielded, self.most_active, self.fail = [], [], 0, False
        self.replies = []  # the reply to each prompt
        self.widest = 0  # the most rows one decode step was given
        self.of_row, self.threads = {}, set()  # of_row: each cache row's latest prompt, as its index in prompts

    def eval(self):
        return self

    def decode_cache(self, length, batch_size):
        return SimpleNamespace(rows=lambda start, stop: start)  # a part's cache: its first row's index

    def __call__(self, tokens, cache, positions, last_only):
        """A prompt's prefill into row `cache`: the logits of the reply's first token (1, 1, vocab_size)."""
        self.forward()
        self.prompts.append(tokens[0].tolist())
        self.replies.append(self.reply(self.prompts[-1]) if callable(self.reply) else self.reply)
        self.yielded.append(0)
        self.of_row[cache] = len(self.prompts) - 1
        return self.next_logits(cache)[None, None], None

    def decode_step(self, tokens, positions, cache):
        self.forward()
        rows = [b for b in range(len(positions)) if positions[b, 0] > 0]  # a free row decodes at position 0
        self.most_active = max(self.most_active, len(rows))
        self.widest = max(self.widest, len(positions))
        logits = torch.zeros(len(positions), self.cfg.vocab_size)
        for b in rows:
            logits[b] = self.next_logits(b)
        return logits

    def forward(self):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("scripted failure")

    def next_logits(self, row):
        i = self.of_row[row]
        n, self.yielded[i] = self.yielded[i], self.yielded[i] + 1
        logits = torch.full((self.cfg.vocab_size,), float("-inf"))
        reply = self.replies[i]
        logits[reply[n] if n < len(reply) else self.filler] = 0.0
        return logits


@contextmanager
def serving(model, tok, **settings):
    """A server on a free port in a thread of this process; yields its base URL and its ServedModel."""
    server = serve.ChatServer(model, tok, serve.ServeConfig(port=0, api_key=KEY, **settings))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.served
    finally:
        server.shutdown()
        server.server_close()


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=20)


def raw(url, method, path, body=b"", headers=None):
    """(status, parsed JSON body) of one request over http.client."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=20)
    conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data) if response.getheader("Content-Type", "").startswith("application/json") \
        else data


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="module")
def ckpt(tokenizer_path, tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    path = tmp_path_factory.mktemp("serve") / "tiny" / "best.pt"
    path.parent.mkdir()
    save_checkpoint({"model": Transformer(cfg).state_dict(), "config": asdict(cfg), "step": 0,
                     "tokenizer": tokenizer_path}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny(ckpt):
    """A random-weight model with a 64-token context, served as load_for_inference loads it."""
    model, tok, _ = load_for_inference(LoadSettings(ckpt=ckpt, device="cpu", dtype="float32"))
    with serving(model, tok, ckpt=ckpt, repetition_penalty=1.0, max_body_bytes=4000) as (url, served):
        yield SimpleNamespace(url=url, model=model, tok=tok, served=served)


def reply_ids(tok, answer, think=None):
    s = special_ids(tok)
    ids = [s["think"], *tok.encode(f"\n{think}\n"), s["end_think"]] if think is not None else []
    return ids + tok.encode(f"\n{answer}") + [s["im_end"]]


def turn_ids(tok, text):
    """The ids of a reply that writes text (the tags in it as their ids), then ends its turn."""
    return tok.encode(text) + [special_ids(tok)["im_end"]]


def stream_parts(stream):
    """(reasoning, content, finish_reason) joined from a streamed chat completion."""
    reasoning, content, finish = [], [], None
    for chunk in stream:
        delta = chunk.choices[0].delta
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        content.append(delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    return "".join(reasoning), "".join(content), finish


def test_models_and_the_page(tiny):
    models = client(tiny.url).models.list()
    assert [m.id for m in models.data] == ["tiny-best"]  # from the checkpoint path
    assert client(tiny.url).models.retrieve("tiny-best").id == "tiny-best"
    status, page = raw(tiny.url, "GET", "/", headers={"Authorization": ""})  # the page needs no key
    assert status == 200 and b"/v1/chat/completions" in page and b"reasoning_content" in page
    assert b"http://" not in page and b"https://" not in page  # nothing fetched from elsewhere


def test_chat_streamed_joins_to_the_answer_not_streamed(tiny):
    parts = [{"type": "text", "text": "Tom found"}, {"type": "text", "text": "a ball."}]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": parts}]
    chat = client(tiny.url).chat.completions
    for settings in (dict(temperature=0), dict(temperature=1.0, top_p=1.0, seed=7)):
        whole = chat.create(model="any", messages=messages, max_tokens=20, **settings)
        choice = whole.choices[0]
        assert whole.object == "chat.completion" and whole.model == "tiny-best"
        prompt = render_prompt(tiny.tok, [messages[0], {"role": "user", "content": "Tom found\na ball."}])
        assert whole.usage.prompt_tokens == len(prompt)
        assert whole.usage.total_tokens == len(prompt) + whole.usage.completion_tokens
        assert 1 <= whole.usage.completion_tokens <= 20
        assert choice.finish_reason == ("length" if whole.usage.completion_tokens == 20 else "stop")
        streamed = chat.create(model="any", messages=messages, max_tokens=20, stream=True,
                               stream_options={"include_usage": True}, **settings)
        chunks = list(streamed)
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        reasoning, content, finish = stream_parts(chunks[:-1])
        assert (reasoning or None, content, finish) == \
            (choice.message.reasoning_content, choice.message.content, choice.finish_reason)
    assert choice.message.content  # sampled: not the greedy run of newlines, which the stripping empties
    again = chat.create(model="any", messages=messages, max_tokens=20, temperature=1.0, top_p=1.0, seed=7)
    assert again.choices[0].message == choice.message  # the same seed, the same text


def test_completions_continue_the_prompt_as_inference_does(tiny):
    completions = client(tiny.url).completions
    prompt = prompt_ids(tiny.tok, "Tom found a")
    new = tiny.model.generate(prompt, max_new_tokens=12, temperature=0, stop_ids=[tiny.tok.eos_id])
    expected = tiny.tok.decode([t for t in new if t != tiny.tok.eos_id])
    whole = completions.create(model="tiny-best", prompt="Tom found a", max_tokens=12, temperature=0)
    assert whole.choices[0].text == expected and whole.usage.completion_tokens == len(new)
    assert whole.choices[0].finish_reason == ("stop" if new[-1] == tiny.tok.eos_id else "length")
    streamed = completions.create(model="tiny-best", prompt="Tom found a", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    # max_tokens beyond the context: cut to the room left
    text = "Tom found a red ball. "
    longest = max((text * k for k in range(1, 20) if len(prompt_ids(tiny.tok, text * k)) < 64), key=len)
    cut = completions.create(model="tiny-best", prompt=longest, max_tokens=100, temperature=0)
    assert cut.usage.prompt_tokens == len(prompt_ids(tiny.tok, longest)) and cut.usage.total_tokens <= 64


QUESTIONS = ["Tom found a red ball.", "Where is Lily?", "Count to three.", "Mia built a boat.", "Hi", "What is 3 + 4?",
             "Sam lost the kite.", "Zoe watched a bird."]


@pytest.fixture(scope="module")
def varied(tok):
    """A random model with a 1,024-token context whose weights (std 0.3) make every question's reply its own (rows
    that mixed would show), served with the default 8 rows."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, "max_seq_len": 1024}))
    spread_weights(model)
    with serving(model, tok) as (url, served):
        yield SimpleNamespace(url=url, served=served, chat=lambda: client(url).chat.completions)


def ask(chat, question, **settings):
    """A streamed chat completion of one question."""
    return chat.create(model="x", messages=[{"role": "user", "content": question}], stream=True, **settings)


def at_once(calls) -> list:
    """What the calls return (or raise), each called in a thread of its own, all let go together."""
    results, start = [None] * len(calls), threading.Barrier(len(calls))

    def run(i):
        start.wait()
        try:
            results[i] = calls[i]()
        except Exception as e:
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_concurrent_streams_decode_together_each_as_it_would_alone(varied):
    greedy = dict(temperature=0, max_tokens=40)
    alone = [stream_parts(ask(varied.chat(), q, **greedy)) for q in QUESTIONS]
    assert len(set(alone)) == len(QUESTIONS)
    varied.served.batch.most_rows = 0
    together = at_once([lambda chat=varied.chat(), q=q: stream_parts(ask(chat, q, **greedy)) for q in QUESTIONS])
    assert together == alone and varied.served.batch.most_rows > 1


def test_the_batch_gives_each_request_the_tokens_model_generate_gives_it_alone(varied, tok):
    """Prompts of different lengths in the rows of one batch, greedy and sampled (each request its own generator,
    seeded), give what model.generate gives each alone: the server's tokens before batching."""
    model, prompts = varied.served.model, [render_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]

    def settings(seed):
        return dict(max_new_tokens=60, top_k=50, temperature=0.9 if seed else 0, top_p=0.9, repetition_penalty=1.05,
                    stop_ids=[special_ids(tok)["im_end"]], generator=torch.Generator().manual_seed(seed))
    for seed in (0, 5):
        alone = [model.generate(p, **settings(seed)) for p in prompts]
        together = at_once([lambda p=p: list(varied.served.batch.tokens(p, settings(seed))) for p in prompts])
        assert together == alone


def test_a_mixture_of_experts_batches_each_request_as_it_would_alone(tok):
    """The batch on a mixture of experts: a token's experts depend on that token alone, so the rows do not mix."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, "max_seq_len": 256, "n_experts": 4, "moe_hidden_dim": 32,
                                       "n_shared_experts": 1, "shared_expert_gate": True}))
    spread_weights(model)
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    settings = dict(max_new_tokens=40, top_k=None, temperature=0, top_p=None, repetition_penalty=1.0,
                    stop_ids=[special_ids(tok)["im_end"]], generator=None)
    alone = [model.generate(p, **settings) for p in prompts]
    assert len({tuple(a) for a in alone}) == len(prompts)
    with serving(model, tok) as (url, served):
        assert at_once([lambda p=p: list(served.batch.tokens(p, settings)) for p in prompts]) == alone


def test_a_dropped_stream_frees_its_row_while_the_others_go_on(varied, tok):
    greedy = dict(temperature=0, max_tokens=40)
    questions = QUESTIONS[:3]
    alone = [stream_parts(ask(varied.chat(), q, **greedy)) for q in questions]
    dropped = ask(varied.chat(), "Tell me about the sea.", temperature=0, max_tokens=900)  # no stop in 900 tokens
    chunks = iter(dropped)
    next(chunks), next(chunks)  # the role, then the first text: it has its row
    (request,) = [r for r in varied.served.batch.rows if r is not None]
    streaming = threading.Barrier(len(questions) + 1)

    def other(chat, question):
        stream = iter(ask(chat, question, **greedy))
        first = next(stream)
        streaming.wait()  # every stream under way before the drop
        return stream_parts([first, *stream])
    dropper = threading.Thread(target=lambda: (streaming.wait(), dropped.close()))
    dropper.start()
    together = at_once([lambda chat=varied.chat(), q=q: other(chat, q) for q in questions])
    dropper.join()
    assert together == alone
    assert eventually(lambda: request not in varied.served.batch.rows)
    assert request.made < 900 and request.last != special_ids(tok)["im_end"]  # it left before its end: freed


def test_a_seeded_request_samples_the_same_text_beside_others(varied):
    seeded = dict(temperature=1.0, top_p=0.95, seed=7, max_tokens=40)
    alone = stream_parts(ask(varied.chat(), "Hi", **seeded))
    assert alone != stream_parts(ask(varied.chat(), "Hi", **{**seeded, "seed": 8}))
    others = [ask(varied.chat(), q, temperature=t, max_tokens=900) for q, t in
              (("Where is Lily?", 0), ("Sam lost the kite.", 0), ("Count to three.", 0.8))]
    for stream in others:
        next(iter(stream)), next(iter(stream))  # under way, each in its row
    varied.served.batch.most_rows = 0
    beside = stream_parts(ask(varied.chat(), "Hi", **seeded))
    assert varied.served.batch.most_rows > 1
    for stream in others:
        stream.close()
    assert beside == alone


def test_reasoning_comes_apart_from_the_answer_and_stop_strings_cut_it(tok):
    model = ScriptedModel(reply_ids(tok, "It is 7, so seven.", think="I add 3 and 4."), tok.encode("x")[0])
    with serving(model, tok) as (url, _):
        chat = client(url).chat.completions
        messages = [{"role": "user", "content": "What is 3 + 4?"}]
        message = chat.create(model="x", messages=messages).choices[0].message
        assert (message.reasoning_content, message.content) == ("I add 3 and 4.", "It is 7, so seven.")
        assert stream_parts(chat.create(model="x", messages=messages, stream=True)) == \
            ("I add 3 and 4.", "It is 7, so seven.", "stop")
        for stop in (", s", ["Its", ", so", "xyz"]):  # "It" held back, then sent
            choice = chat.create(model="x", messages=messages, stop=stop).choices[0]
            assert (choice.message.content, choice.finish_reason) == ("It is 7", "stop")
            assert stream_parts(chat.create(model="x", messages=messages, stop=stop, stream=True)) == \
                ("I add 3 and 4.", "It is 7", "stop")
        choice = chat.create(model="x", messages=messages, max_tokens=3).choices[0]
        assert choice.finish_reason == "length" and choice.message.content == ""
    assert model.widest == 1  # one request at a time: each step decodes its row alone, not the batch's 8
    assert tok.decode(model.prompts[0]) == "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"


def test_refusals_are_openai_errors(tiny):
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        client(tiny.url, key="wrong").models.list()
    status, body = raw(tiny.url, "GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = raw(tiny.url, "POST", "/v1/chat/completions", b'{"messages": [')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith("the request body is not valid JSON")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = raw(tiny.url, "POST", "/v1/chat/completions", b"{" + b" " * 4000 + b"}")
    assert status == 413 and "4002 bytes" in body["error"]["message"]
    status, body = raw(tiny.url, "POST", "/v1/nothing", b"{}")
    assert status == 404 and body["error"]["message"] == "no such route: POST /v1/nothing"
    status, body = raw(tiny.url, "DELETE", "/v1/models")
    assert status == 501 and "error" in body
    chat = client(tiny.url).chat.completions
    messages = [{"role": "user", "content": "Tom found a red ball in the park. " * 10}]
    n = len(render_prompt(tiny.tok, messages))
    with pytest.raises(openai.BadRequestError, match=f"the prompt is {n} tokens but the model's context is 64"):
        chat.create(model="x", messages=messages)
    for bad, param in ((dict(temperature="hot"), "temperature"), (dict(max_tokens=0), "max_tokens"),
                       (dict(messages=[{"role": "function", "content": "x"}]), "messages[0]"),
                       (dict(stop=[3]), "stop")):
        with pytest.raises(openai.BadRequestError) as e:
            chat.create(**{"model": "x", "messages": [{"role": "user", "content": "Hi"}], **bad})
        assert e.value.body["param"] == param
    assert chat.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices  # still serving


def test_a_bug_is_a_500_and_the_server_goes_on(tok, capfd):
    model = ScriptedModel(reply_ids(tok, "Fine."), tok.encode("x")[0])
    with serving(model, tok) as (url, _):
        chat = client(url).chat.completions
        messages = [{"role": "user", "content": "Hi"}]
        model.fail = True
        with pytest.raises(openai.InternalServerError, match="scripted failure"):
            chat.create(model="x", messages=messages)
        with pytest.raises(openai.APIError, match="scripted failure"):  # mid-stream: an error event
            list(chat.create(model="x", messages=messages, stream=True))
        model.fail = False
        assert chat.create(model="x", messages=messages).choices[0].message.content == "Fine."
    err = capfd.readouterr().err
    assert "Traceback" in err and "RuntimeError: scripted failure" in err
    assert "POST /v1/chat/completions 500 0 tokens" in err and "POST /v1/chat/completions 200+500 0 tokens" in err
    assert re.search(r"POST /v1/chat/completions 200 \d+ tokens \d+\.\d\ds\n", err)


def test_a_client_gone_mid_stream_frees_its_row_at_once(tok):
    model = ScriptedModel([], tok.encode("x")[0], delay=0.01)  # 4,096 tokens: 40 s if nothing stops it
    with serving(model, tok, batch_size=1) as (url, served):  # one row: the next request needs this one's
        body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "Hi"}], "stream": True}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() +
                      b"\r\n\r\n" + body)
            received = b""
            while b'"content": "x' not in received:
                received += s.recv(65536)
        t0 = time.perf_counter()
        model.delay = 0
        answer = client(url).chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=5)
        assert answer.choices[0].message.content == "xxxxx" and time.perf_counter() - t0 < 2
        assert model.yielded == [model.yielded[0], 5] and model.yielded[0] < 100 and served.batch.rows == [None]


def eventually(condition, timeout=20.0) -> bool:
    """Whether condition() comes true within timeout seconds."""
    deadline = time.perf_counter() + timeout
    while not condition() and time.perf_counter() < deadline:
        time.sleep(0.01)
    return condition()


def test_requests_decode_together_and_those_past_the_batch_wait_in_order(tok):
    model = ScriptedModel([], tok.encode("x")[0], delay=0.01)
    prompts = [[{"role": "user", "content": f"Question {i}"}] for i in range(4)]
    with serving(model, tok, batch_size=2) as (url, served):
        results = {}

        def ask(i, stream):
            chat = client(url).chat.completions.create(model="x", messages=prompts[i], max_tokens=50, stream=stream)
            results[i] = stream_parts(chat)[1] if stream else chat.choices[0].message.content
        threads = [threading.Thread(target=ask, args=(i, i % 2 == 1)) for i in range(4)]
        for i, t in enumerate(threads):  # each one in its row or in the queue before the next comes
            t.start()
            assert eventually(lambda: len(model.prompts) + len(served.batch.waiting) > i)
        for t in threads:
            t.join(timeout=20)
    assert results == {i: "x" * 50 for i in range(4)}
    assert model.most_active == served.batch.most_rows == 2  # two rows in one decode step, never more
    assert model.prompts == [render_prompt(tok, p) for p in prompts]  # rows given first come, first served
    assert len(model.threads) == 1 and model.threads != {threading.current_thread().name}  # the model's own thread


@pytest.mark.parametrize("text, stops, expected", [
    ("\n It is 7, so seven.\n\n", [], "It is 7, so seven."),
    ("\nIt is 7, so seven.\n", [", so", "Its"], "It is 7"),
    ("It is 7 \n, so", [", so"], "It is 7"),
    ("  \n", ["x"], ""),
])
def test_part_text_streams_exactly_the_text_it_gives_whole(text, stops, expected):
    whole = serve.PartText(stops)
    assert whole.add(text) + whole.rest() == expected
    streamed = serve.PartText(stops)
    pieces = [streamed.add(c) for c in text] + [streamed.rest()]
    assert "".join(pieces) == expected
    for i, piece in enumerate(pieces):  # nothing held longer than it must be
        seen = text[:i + 1]
        if not any(s in seen for s in stops) and not seen[-1].isspace() and not any(
                seen.endswith(s[:k]) for s in stops for k in range(1, len(s))):
            assert "".join(pieces[:i + 1]) == seen.strip()
    assert serve.PartText([", so"], strip=False).add(" a, so b") == " a"


def api(model, tok):
    """The API without HTTP: a ServedModel to hand request bodies to, its model thread shut down on closing."""
    return closing(serve.ServedModel(model, tok, serve.ServeConfig(model_name="tiny")))


def test_dynamic_rope_scaling_decodes_one_request_at_a_time(tok, capsys):
    """Its RoPE tables follow a decode step's longest row, so rows decoded together would change each other."""
    model = ScriptedModel([], tok.encode("x")[0])
    model.cfg.rope_scaling = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 2048}
    with api(model, tok) as served:
        assert served.batch.rows == [None]
    assert "one request decodes at a time" in capsys.readouterr().err


def test_the_api_answers_a_body_with_openai_json(tok):
    reply = reply_ids(tok, "It is 7.", think="I add 3 and 4.")
    model = ScriptedModel(reply, tok.encode("x")[0])
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    with api(model, tok) as served:
        tally = serve.Tally()
        answer = serve.chat_completion(served, {"model": "any", "messages": messages}, tally)
    prompt = render_prompt(tok, messages)
    assert answer["id"].startswith("chatcmpl-") and (answer["object"], answer["model"]) == ("chat.completion", "tiny")
    assert answer["choices"] == [{"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
        "role": "assistant", "content": "It is 7.", "reasoning_content": "I add 3 and 4."}}]
    assert answer["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(reply),
                               "total_tokens": len(prompt) + len(reply)}
    assert tally.completion_tokens == len(reply) and model.prompts == [prompt]


def test_the_api_takes_enable_thinking_from_chat_template_kwargs_or_the_soft_switch(tok):
    s = special_ids(tok)
    answered = ScriptedModel(reply_ids(tok, "It is 7."), tok.encode("x")[0])
    reasoned = ScriptedModel([*tok.encode("\nI add 3 and 4.\n"), s["end_think"], *reply_ids(tok, "It is 7.")],
                             tok.encode("x")[0])  # goes on from the open think block
    question = {"role": "user", "content": "What is 3 + 4?"}
    cases = [  # (model, messages, chat_template_kwargs, enable_thinking the prompt must have)
        (answered, [question], {"enable_thinking": False}, False),
        (reasoned, [question], {"enable_thinking": True}, True),
        (answered, [question], {"enable_thinking": None, "other": 1}, None),
        (answered, [{"role": "user", "content": "What is 3 + 4? /no_think"}], None, False),
        (reasoned, [{"role": "user", "content": "What is 3 + 4?\n/think"}], {}, True),
        (reasoned, [{"role": "user", "content": "What is 3 + 4? /no_think"}], {"enable_thinking": True}, True),
        (answered, [{"role": "user", "content": "Hi /no_think"}, {"role": "assistant", "content": "Hi."},
                    question], None, False),  # the latest switch holds
    ]
    for model, messages, kwargs, enable_thinking in cases:
        body = {"messages": messages} if kwargs is None else {"messages": messages, "chat_template_kwargs": kwargs}
        with api(model, tok) as served:
            message = serve.chat_completion(served, body, serve.Tally())["choices"][0]["message"]
        seen = [{**m, "content": m["content"].removesuffix(" /no_think").removesuffix("\n/think")} for m in messages]
        assert model.prompts[-1] == render_prompt(tok, seen, enable_thinking=enable_thinking), body
        assert message["content"] == "It is 7."
        assert message["reasoning_content"] == ("I add 3 and 4." if model is reasoned else None)
    assert tok.decode(answered.prompts[0]).endswith("<|im_start|>assistant\n" + EMPTY_THINK)
    with serving(answered, tok) as (url, _):  # as an OpenAI client sends it to vLLM
        chat = client(url).chat.completions
        message = chat.create(model="x", messages=[question], extra_body={
            "chat_template_kwargs": {"enable_thinking": False}}).choices[0].message
        assert message.content == "It is 7." and answered.prompts[-1] == answered.prompts[0]
        for kwargs, param in (({"enable_thinking": "no"}, "chat_template_kwargs.enable_thinking"),
                              ([False], "chat_template_kwargs")):
            with pytest.raises(openai.BadRequestError) as e:
                chat.create(model="x", messages=[question], extra_body={"chat_template_kwargs": kwargs})
            assert e.value.body["param"] == param


def test_the_api_streams_the_role_then_the_deltas_then_the_finish(tok):
    model = ScriptedModel(reply_ids(tok, "It is 7.", think="I add 3 and 4."), tok.encode("x")[0])
    body = {"messages": [{"role": "user", "content": "What is 3 + 4?"}], "stream": True,
            "stream_options": {"include_usage": True}}
    with api(model, tok) as served:
        tally = serve.Tally()
        chunks = serve.chat_completion(served, body, tally)
        assert model.prompts == []  # generated as the chunks are taken
        chunks = list(chunks)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(deltas) - 1) + ["stop"]
    pieces = [next(iter(d.items())) for d in deltas[1:-1]]
    assert all(len(d) == 1 for d in deltas[1:-1])
    assert [part for part, _ in pieces] == sorted((part for part, _ in pieces), key=lambda p: p == "content")
    assert "".join(text for part, text in pieces if part == "reasoning_content") == "I add 3 and 4."
    assert "".join(text for part, text in pieces if part == "content") == "It is 7."
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == tally.usage()  # include_usage's last chunk


def test_the_api_stops_generating_when_its_chunks_are_closed(tok):
    model = ScriptedModel([], tok.encode("x")[0], delay=0.01)  # 4,096 tokens, 40 s, if nothing stops it
    with api(model, tok) as served:
        chunks = serve.chat_completion(served, {"messages": [{"role": "user", "content": "Hi"}], "stream": True},
                                       serve.Tally())
        assert next(chunks)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert next(chunks)["choices"][0]["delta"] == {"content": "x"}
        chunks.close()  # as the Handler does when the client has gone
        assert eventually(lambda: served.batch.rows.count(None) == len(served.batch.rows))
        made = model.yielded[0]
        time.sleep(0.1)
        assert made < 50 and model.yielded == [made]  # its row freed: no more tokens


def test_the_openai_client_calls_a_tool_then_gets_the_answer_to_its_result(tok):
    """The tool flow of an OpenAI client, streamed (the client's own stream helper puts the reply together) and not:
    the model's call comes back in tool_calls; the call and its result sent back reach the model as the template has
    them, and its answer comes back."""
    s = special_ids(tok)

    def reply(prompt):  # the call, then, once a result is in the prompt, the answer
        return turn_ids(tok, "It is sunny." if s["tool_response"] in prompt else "Let me look.\n" + call_text(WEATHER))
    model = ScriptedModel(reply, tok.encode("x")[0])
    with serving(model, tok) as (url, _):
        chat = client(url).chat.completions
        for stream in (False, True):
            if stream:
                with chat.stream(model="x", messages=[QUESTION], tools=TOOLS) as events:
                    kinds = {event.type for event in events}
                choice = events.get_final_completion().choices[0]
                assert "tool_calls.function.arguments.done" in kinds
            else:
                choice = chat.create(model="x", messages=[QUESTION], tools=TOOLS).choices[0]
            (call,) = choice.message.tool_calls
            assert (choice.message.content, choice.finish_reason) == ("Let me look.", "tool_calls")
            assert call.type == "function" and re.fullmatch(r"call_[0-9a-f]{24}", call.id)
            assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
            result = {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C."}
            answer = chat.create(model="x", messages=[QUESTION, choice.message, result], tools=TOOLS).choices[0]
            assert (answer.message.content, answer.message.tool_calls, answer.finish_reason) == \
                ("It is sunny.", None, "stop")
        with pytest.raises(openai.BadRequestError) as e:
            chat.create(model="x", messages=[QUESTION], tools=TOOLS,
                        tool_choice={"type": "function", "function": {"name": "get_date"}})
        assert e.value.body["param"] == "tool_choice"
    called = [QUESTION, {"role": "assistant", "content": "Let me look.", "tool_calls": [WEATHER]},
              {"role": "tool", "content": "Sunny, 24 C."}]
    assert model.prompts == [render_prompt(tok, [QUESTION], tools=TOOLS), render_prompt(tok, called, tools=TOOLS)] * 2
    assert "<|im_start|>user\n<tool_response>\nSunny, 24 C.\n</tool_response><|im_end|>" in tok.decode(model.prompts[1])


def test_tool_choice_offers_the_tools_or_not_and_opens_the_reply_with_the_call_it_asks_for(tok):
    """auto (the default) and none render the prompt with the tools and without; required and a named function end
    it with the call's opening, which the reply the client gets starts with. A call with none is only text."""
    called = call_text(WEATHER)
    named = '<tool_call>\n{"name": "get_weather", "arguments":'  # up to the space before the arguments' "{"
    offered = render_prompt(tok, [QUESTION], tools=TOOLS)
    cases = [  # (the request's settings, the prompt the model must get, what it writes, whether that is a call)
        ({}, offered, called, True),
        ({"tool_choice": "auto"}, offered, called, True),
        ({"tool_choice": "none"}, render_prompt(tok, [QUESTION]), called, False),
        ({"tool_choice": "required"}, offered + tok.encode("<tool_call>\n"), called.removeprefix("<tool_call>\n"),
         True),
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}},
          "chat_template_kwargs": {"enable_thinking": False}},  # the opening after the empty think block
         render_prompt(tok, [QUESTION], enable_thinking=False, tools=TOOLS) + tok.encode(named),
         called.removeprefix(named), True),
    ]
    for settings, prompt, written, is_call in cases:
        model = ScriptedModel(turn_ids(tok, written), tok.encode("x")[0])
        with api(model, tok) as served:
            choice = serve.chat_completion(served, {"messages": [QUESTION], "tools": TOOLS, **settings},
                                           serve.Tally())["choices"][0]
        assert model.prompts == [prompt], settings
        if is_call:
            (call,) = choice["message"].pop("tool_calls")
            assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        assert choice["message"] == {"role": "assistant", "content": None if is_call else called,
                                     "reasoning_content": None}
        assert choice["finish_reason"] == ("tool_calls" if is_call else "stop")
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n" + EMPTY_THINK + named)


def test_the_api_streams_each_call_whole_once_its_end_tag_is_read(tok):
    s = special_ids(tok)
    written = "Let me look.\n" + call_text(WEATHER) + "\n" + call_text({"name": "get_time", "arguments": {}})
    reply = turn_ids(tok, written)
    model = ScriptedModel(reply, tok.encode("x")[0])
    with api(model, tok) as served:
        tally = serve.Tally()
        calls, read_when_sent, deltas = [], [], []
        for chunk in serve.chat_completion(served, {"messages": [QUESTION], "tools": TOOLS, "stream": True}, tally):
            deltas.append(chunk["choices"][0]["delta"])
            if "tool_calls" in deltas[-1]:
                calls += deltas[-1]["tool_calls"]
                read_when_sent.append(tally.completion_tokens)
    ends = [i + 1 for i, token in enumerate(reply) if token == s["end_tool_call"]]
    assert read_when_sent == ends  # each at its </tool_call>, not at the end of the reply
    assert [(c["index"], c["type"], c["function"]) for c in calls] == [
        (0, "function", {"name": "get_weather", "arguments": '{"city": "Paris"}'}),
        (1, "function", {"name": "get_time", "arguments": "{}"})]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert "".join(d.get("content", "") for d in deltas) == "Let me look."
    assert deltas[-1] == {} and chunk["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("written, max_tokens, finish", [
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', None, "stop"),
    ('<tool_call>\n["get_weather", {"city": "Paris"}]\n</tool_call>', None, "stop"),
    (call_text(WEATHER), 6, "length"),
], ids=["not JSON", "not a call", "cut short"])
def test_a_call_that_does_not_parse_comes_back_as_text_in_the_content(tok, written, max_tokens, finish):
    reply = turn_ids(tok, written)
    content = tok.decode(reply[:max_tokens or -1])  # the tags spelled out
    assert TOOL_PIECES["tool_call"] in content
    model = ScriptedModel(reply, tok.encode("x")[0])
    body = {"messages": [QUESTION], "tools": TOOLS, "max_tokens": max_tokens}
    with api(model, tok) as served:
        choice = serve.chat_completion(served, body, serve.Tally())["choices"][0]
        chunks = list(serve.chat_completion(served, {**body, "stream": True}, serve.Tally()))
    assert choice["message"] == {"role": "assistant", "content": content, "reasoning_content": None}
    assert choice["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"] == finish
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content", "") for d in deltas) == content and not any("tool_calls" in d for d in deltas)


def test_a_tokenizer_without_the_tool_tags_refuses_a_chat_with_tools(tok):
    older = copy.copy(tok)  # a tokenizer from before the tool tags
    older.chat_ids = {**tok.chat_ids, **dict.fromkeys(TOOL_PIECES)}
    model = ScriptedModel(turn_ids(tok, "Hi."), tok.encode("x")[0])
    result = [QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
              {"role": "tool", "tool_call_id": "call_1", "content": "Sunny."}]
    with api(model, older) as served:
        for body in ({"messages": [QUESTION], "tools": TOOLS}, {"messages": result}):  # offered, or in the history
            with pytest.raises(serve.ApiError) as e:
                serve.chat_completion(served, body, serve.Tally())
            assert e.value.status == 400
            assert e.value.message.endswith("the tokenizer has no <tool_call> piece, so the model cannot call tools; "
                                            "train one with python train_tokenizer.py")
        answer = serve.chat_completion(served, {"messages": [QUESTION]}, serve.Tally())  # a chat without tools
    assert answer["choices"][0]["message"]["content"] == "Hi." and len(model.prompts) == 1


@pytest.mark.parametrize("endpoint, body, param, code, message", [  # a 32-token context; "Hi" fits
    ("chat_completion", dict(temperature=2.5), "temperature", None,
     "temperature: expected a number from 0 to 2, got 2.5"),
    ("chat_completion", dict(messages=[{"role": "user", "content": "Tom found a red ball. " * 5}]), "messages",
     "context_length_exceeded", "the prompt is"),
    ("chat_completion", dict(n=2), "n", None, "n: only 1 is supported"),
    ("text_completion", dict(prompt=3), "prompt", None, "prompt: expected a string"),
    ("text_completion", dict(prompt="Tom found a red ball. " * 5), "prompt", "context_length_exceeded",
     "the prompt is"),
    ("chat_completion", dict(tools="[{"), "tools", None, '"tools" is not valid JSON'),
    ("chat_completion", dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools", None,
     '"tools" is not a list of functions with a "name"'),
    ("chat_completion", dict(messages=[QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": '}}]}]),
     "messages", None, '"messages"[1]["tool_calls"][0] arguments is not valid JSON'),
    ("chat_completion", dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_date"}}),
     "tool_choice", None, 'tool_choice: no tool named "get_date" in tools (the request\'s: get_weather, get_time)'),
    ("chat_completion", dict(tools=TOOLS, tool_choice="always"), "tool_choice", None, 'tool_choice: expected "auto"'),
    ("chat_completion", dict(tool_choice="required"), "tool_choice", None,
     "tool_choice: required, but the request has no tools"),
    ("chat_completion", dict(tools=TOOLS, tool_choice="required", chat_template_kwargs={"enable_thinking": True}),
     "tool_choice", None, "tool_choice: the reply opens with the call, so it cannot open with reasoning"),
], ids=["temperature", "chat context", "n", "prompt", "completion context", "tools not JSON", "tool without a name",
        "arguments not JSON", "unknown tool_choice name", "tool_choice", "required without tools",
        "required with thinking"])
def test_the_api_refuses_a_request_before_generating(tok, endpoint, body, param, code, message):
    model = ScriptedModel([], tok.encode("x")[0], max_seq_len=32)
    with api(model, tok) as served:
        for stream in (False, True):  # a stream is refused before its first chunk too
            with pytest.raises(serve.ApiError) as e:
                getattr(serve, endpoint)(served, {"messages": [{"role": "user", "content": "Hi"}], "prompt": "Hi",
                                                  **body, "stream": stream}, serve.Tally())
            assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
            assert e.value.message.startswith(message)
    assert model.prompts == []


def test_command_line_serves_until_ctrl_c_and_a_busy_port_is_one_line(ckpt):
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--ckpt", ckpt, "--port", "0",
                             "--model_name", "tiny", "--quantize", "none"], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("serving"):  # after any notes of loading
            line = proc.stderr.readline()
            assert line, "the server exited"
        assert line.startswith("serving tiny at http://127.0.0.1:"), line
        url = line.split()[3].rstrip("/")
        assert [m.id for m in openai.OpenAI(base_url=url + "/v1", api_key="none").models.list().data] == ["tiny"]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{url.rsplit(':', 1)[1]}"):
            serve.run(serve.ServeConfig(ckpt=ckpt, port=int(url.rsplit(":", 1)[1])))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130


def test_closing_the_server_ends_the_threads_of_connections_left_open(tok):
    """A client's keep-alive connection keeps its thread waiting for the next request: closing the server closes it
    and waits for the thread, which would otherwise wake up during interpreter exit and abort the process."""
    def handler_threads():  # of every server in this process: other tests' may still run
        return {t for t in threading.enumerate() if "process_request_thread" in t.name}
    others = handler_threads()
    model = ScriptedModel(reply_ids(tok, "Hi."), tok.encode("x")[0])
    server = serve.ChatServer(model, tok, serve.ServeConfig(port=0, api_key=KEY))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert json.loads(connection.getresponse().read())["choices"][0]["message"]["content"] == "Hi."
    assert len(server.connections) == 1  # kept open for the next request
    server.shutdown()
    server.server_close()
    assert not server.connections and handler_threads() <= others
    connection.close()
