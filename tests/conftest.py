import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: seconds or more (a pipeline, a subprocess, a compile): left out of "
                                       "the fast tier, python -m pytest -m 'not slow' tests")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class RandomTokens:
    """Stands in for TokenShards: batch i is a fixed random (tokens, targets) pair."""

    def __init__(self, vocab_size, batch_size, seq_len, num_tokens=10**9):
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len
        self.num_tokens, self.tokens_per_row = num_tokens, seq_len

    def batch(self, i):
        x = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1),
                          generator=torch.Generator().manual_seed(i))
        return {"tokens": x[:, :-1], "targets": x[:, 1:]}


@torch.no_grad()
def spread_weights(model, std: float = 0.3):
    """Every matrix of the model drawn from N(0, std), wider than at initialisation: greedy tokens vary from
    prompt to prompt, with clear margins between the best and the next."""
    for p in model.parameters():
        if p.dim() == 2:
            p.normal_(0, std)
    return model


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: forward(tokens) -> (logits, None); with targets and target_logprobs, as
    model.Transformer gives them, (None, log p(target) at temperature, 0 where the target is -100)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, tokens, targets=None, target_logprobs=False, temperature=1.0):
        if not target_logprobs:
            return self.logits, None
        logp = torch.log_softmax(self.logits.float() / temperature, -1)
        return None, logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)


def small_corpus(n_lines: int = 3000, seed: int = 0):
    """Varied English sentences with some Chinese and digits: enough to train a tiny tokenizer."""
    rng = random.Random(seed)
    names = ["Tom", "Lily", "Sam", "Mia", "Ben", "Anna", "Max", "Zoe"]
    verbs = ["found", "painted", "carried", "lost", "shared", "built", "watched", "counted"]
    things = ["a red ball", "the old boat", "three apples", "a tiny bird", "the blue kite", "some bread"]
    places = ["in the park", "near the river", "at school", "under the tree", "by the sea"]
    zh = ["今天天气很好。", "我们去公园散步。", "他有三个苹果。", "小猫在树下睡觉。"]
    lines = []
    for _ in range(n_lines):
        s = f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(things)} {rng.choice(places)}."
        if rng.random() < 0.3:
            s += f" It was {rng.randint(1, 99)} steps away."
        if rng.random() < 0.1:
            s += " " + rng.choice(zh)
        lines.append(s)
    return lines


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A 512-piece tokenizer with the project's special pieces, trained once per test session."""
    import train_tokenizer
    d = tmp_path_factory.mktemp("tokenizer")
    corpus = d / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in small_corpus()), encoding="utf-8")
    cfg = train_tokenizer.TokenizerConfig(inputs=str(corpus), out=str(d / "tokenizer.model"),
                                          vocab_size=512, character_coverage=1.0)
    return train_tokenizer.train(cfg)


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer.json like SmolLM2's, trained once per test session: <|endoftext|> its
    one special piece, named eos by the tokenizer_config.json beside it; no chat markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("hf_tokenizer")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(small_corpus(), trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|endoftext|>"}}))
    return str(d / "tokenizer.json")


@pytest.fixture(scope="session")
def hf_chat_tokenizer_json(hf_tokenizer_json, tmp_path_factory):
    """hf_tokenizer_json with the special pieces (chat markers, think and tool tags) appended by
    tokenizer.add_chat_pieces, as an import gets them."""
    from tokenizer import add_chat_pieces
    d = tmp_path_factory.mktemp("hf_chat_tokenizer")
    shutil.copy(Path(hf_tokenizer_json).with_name("tokenizer_config.json"), d)
    add_chat_pieces(hf_tokenizer_json, str(d / "tokenizer.json"))
    return str(d / "tokenizer.json")
