"""model.py: cached decoding, sampling conventions, checkpoint loading errors."""
import copy

import pytest
import torch

from conftest import spread_weights
from model import (KVCache, ModelConfig, ModelError, Transformer, compile_decoding, fuse_projections,
                   load_state_dict_checked, read_checkpoint, sample)

TINY = dict(dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=80, max_seq_len=64)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 4}, {"rope_scaling": {
    "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}])
def test_cached_decoding_matches_full_forward(overrides):
    """Also past the original length (16) of the scaled RoPE types whose rotation is fixed per position."""
    model = tiny_model(**overrides)
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        full = model(tokens)[0]
        cache = model.new_cache(batch_size=2)
        # a prompt, then a chunk of several tokens after it (offset causal mask), then one at a time
        pieces = [model(tokens[:, :10], cache=cache)[0], model(tokens[:, 10:14], cache=cache)[0]]
        pieces += [model(tokens[:, t:t + 1], cache=cache)[0] for t in range(14, 30)]
    assert cache.pos == 30
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_last_only_and_cache_bounds():
    model = tiny_model()
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, last_only=True)[0], model(tokens)[0][:, -1:])
        cache = model.new_cache(max_len=12)
        model(tokens, cache=cache)
        with pytest.raises(ValueError, match="KV cache"):
            model(tokens[:, :1], cache=cache)
        with pytest.raises(ValueError, match="max_seq_len"):
            model(torch.zeros(1, 65, dtype=torch.long))
    assert KVCache(model.cfg, max_len=1000).max_len == 64  # never more than the context


def test_generate_greedy_equals_argmax_loop():
    model = tiny_model()
    prompt = [5, 17, 3]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert model.generate(prompt, max_new_tokens=12, temperature=0) == ids[3:]


def test_decode_step_at_any_position_matches_full_forward():
    """The step compile_decoding compiles: one token at a position given as a tensor, the fixed-size
    cache written there and read whole, masked to the positions so far (stale entries beyond it ignored)."""
    model = tiny_model()
    tokens = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = model(tokens)[0][0]
        cache = model.new_cache(max_len=32)
        for k in cache.k + cache.v:
            k.fill_(1e4)  # what an earlier, longer generation could have left behind
        model(tokens[:, :8], cache=cache, positions=torch.arange(8))
        steps = [model.decode_step(tokens[:, t:t + 1], torch.tensor([t]), cache)[0] for t in range(8, 20)]
    assert cache.pos == 0  # positions given: the caller keeps count
    torch.testing.assert_close(torch.stack(steps), full[8:], atol=1e-5, rtol=0)


PROMPTS = [[5, 17, 3], list(range(1, 30)), [42], [9, 8, 7, 6, 5, 4, 3]]  # of different lengths


def test_batched_greedy_generation_gives_each_row_what_generate_gives_its_prompt():
    """generate_batch: n rows per prompt, right-padded prompts at their own positions in one cache; rows that
    stop early (a stop id) are carried along until the last one stops."""
    model = tiny_model()

    def both(stop_ids):
        alone = [model.generate(p, max_new_tokens=16, temperature=0, stop_ids=stop_ids) for p in PROMPTS]
        return model.generate_batch(PROMPTS, n=2, max_new_tokens=16, temperature=0, stop_ids=stop_ids), \
            [row for row in alone for _ in range(2)]
    rows, alone = both(())
    assert rows == alone
    rows, alone = both((rows[0][2],))  # a stop id the first prompt meets by its third token
    assert rows == alone
    assert len(rows[0]) <= 3 and len({len(row) for row in rows}) > 1  # rows stopped at different steps


def test_batched_sampling_repeats_for_a_seed_and_draws_each_row_apart():
    model = tiny_model()

    def sampled(seed):
        return model.generate_batch(PROMPTS[:2], n=4, max_new_tokens=12, temperature=1.0, top_k=40, top_p=0.95,
                                    repetition_penalty=1.1, generator=torch.Generator().manual_seed(seed))
    first = sampled(0)
    assert first == sampled(0) and first != sampled(1)
    assert len({tuple(row) for row in first[:4]}) > 1  # the n completions of one prompt differ
    with pytest.raises(ModelError, match="at least one prompt"):
        model.generate_batch([], n=2)


@pytest.mark.slow
def test_compiled_decoding_gives_the_eager_greedy_tokens():
    model = tiny_model()
    prompts = [[5, 17, 3], list(range(1, 40))]  # cache sizes: exactly the length eager, 256 capped at 64 compiled
    eager = [model.generate(p, max_new_tokens=20, temperature=0) for p in prompts]
    compile_decoding(model)
    assert [model.generate(p, max_new_tokens=20, temperature=0) for p in prompts] == eager
    assert list(model.decode_caches) == [(1, 64)]  # one cache (and graph) for both
    rows = model.generate_batch(prompts, n=2, max_new_tokens=20, temperature=0)  # batched: its own graph
    assert rows == [eager[0], eager[0], eager[1], eager[1]] and (4, 64) in model.decode_caches
    with pytest.raises(ModelError, match="dynamic"):
        compile_decoding(tiny_model(rope_scaling={"rope_type": "dynamic", "factor": 2.0,
                                                  "original_max_position_embeddings": 32}))


def test_fused_projections_keep_the_weights_and_the_outputs():
    """wq/wk/wv and w1/w3 stacked for generation: the same logits and greedy tokens, the same state_dict (names
    and values), parameter count and storage (the original layers are views of the stacked rows)."""
    from quantize import quantize_model
    for model in (tiny_model(), quantize_model(tiny_model())):
        state = {name: t.clone() for name, t in model.state_dict().items()}
        n_params, tokens = model.num_params(), torch.randint(0, 97, (1, 20))
        with torch.no_grad():
            logits = model(tokens)[0]
        greedy = model.generate([5, 17, 3], max_new_tokens=20, temperature=0)
        fuse_projections(model)
        attention, ffn = model.layers[0].attention, model.layers[0].feed_forward
        assert attention.wqkv.out_features == 48 + 24 + 24 and ffn.w13.out_features == 2 * 80
        assert attention.wk.weight.untyped_storage().data_ptr() == attention.wqkv.weight.untyped_storage().data_ptr()
        assert model.num_params() == n_params and list(model.state_dict()) == list(state)
        assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())
        with torch.no_grad():
            torch.testing.assert_close(model(tokens)[0], logits, atol=1e-6, rtol=0)
        assert model.generate([5, 17, 3], max_new_tokens=20, temperature=0) == greedy


def test_top_k_1_is_greedy_and_seed_reproducible():
    model = tiny_model()
    greedy = model.generate([1, 2, 3], max_new_tokens=15, temperature=0)
    assert model.generate([1, 2, 3], max_new_tokens=15, temperature=1.5, top_k=1) == greedy

    def sampled(seed):
        return model.generate([1, 2, 3], max_new_tokens=15, temperature=1.0, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))
    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)  # random init: near-uniform logits, so 15 draws differ


def test_stop_ids_and_context_limit():
    model = tiny_model()
    free = model.generate([1, 2, 3], max_new_tokens=10, temperature=0)
    stop = free[4]
    out = model.generate([1, 2, 3], max_new_tokens=10, temperature=0, stop_ids=[stop])
    assert out == free[:free.index(stop) + 1]  # stops at the first stop id, which is yielded
    assert len(model.generate(list(range(60)), max_new_tokens=50, temperature=0)) == 4  # context is 64
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(list(range(64)), max_new_tokens=1)
    with pytest.raises(ValueError, match="vocabulary"):
        model.generate([1, 200], max_new_tokens=1)


def test_repetition_penalty_follows_transformers():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5])
    seen = torch.tensor([True, True, False, False, False])
    # seen positive logits are divided, seen negative ones multiplied: 2 -> 0.5 (< 1), -2 -> -8
    assert sample(logits, temperature=0, repetition_penalty=4.0, seen=seen) == 2
    assert sample(logits, temperature=0, repetition_penalty=1.0, seen=seen) == 0
    transformers = pytest.importorskip("transformers")
    processor = transformers.RepetitionPenaltyLogitsProcessor(penalty=1.7)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        logits = torch.randn(20, generator=g)
        history = torch.randint(0, 20, (8,), generator=g)
        seen = torch.zeros(20, dtype=torch.bool)
        seen[history] = True
        theirs = processor(history[None], logits[None].clone())[0]
        assert sample(logits, temperature=0, repetition_penalty=1.7, seen=seen) == int(theirs.argmax())


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, top_k=2, generator=g) for _ in range(300)}
    assert drawn == {0, 1}
    drawn = {sample(logits, top_p=0.85, generator=g) for _ in range(300)}
    assert drawn == {0, 1, 2}  # 0.5 + 0.3 < 0.85, so the third token is still needed
    drawn = {sample(logits, top_p=0.7, generator=g) for _ in range(300)}
    assert drawn == {0, 1}


def test_shape_mismatch_names_tensor_and_shapes():
    model = tiny_model()
    state = tiny_model(dim=64).state_dict()
    with pytest.raises(ValueError) as err:
        load_state_dict_checked(model, state, "x.pt")
    message = str(err.value)
    assert "\n" not in message and "tok_embeddings.weight" in message
    assert "(97, 64)" in message and "(97, 48)" in message
    state = model.state_dict()
    del state["norm.weight"]
    with pytest.raises(ValueError, match="missing tensor norm.weight"):
        load_state_dict_checked(model, state)


def test_read_checkpoint_rejects_bad_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {}, "config": {}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": 1}, foreign)
    assert read_checkpoint(str(good)) == {"model": {}, "config": {}}
    for path, words in [(truncated, "corrupt or truncated"), (text, "corrupt or truncated"),
                        (foreign, "not a checkpoint of this project"), (tmp_path / "none.pt", "no such checkpoint")]:
        with pytest.raises(ValueError, match=words):
            read_checkpoint(str(path))


def test_packed_rows_need_positions_and_document_ids_and_checkpoint_the_same():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, max_seq_len=16))
    tokens = torch.randint(0, 50, (2, 12))
    documents = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    positions = torch.stack([torch.cat([torch.arange(5), torch.arange(7)]), torch.arange(12)])
    with pytest.raises(ModelError, match="both positions and document_ids"):
        model(tokens, positions=positions)
    with pytest.raises(ModelError, match="no KV cache"):
        model(tokens, positions=positions, document_ids=documents, cache=model.new_cache(2))
    # a row holding one document from position 0 is the plain causal forward
    plain = model(tokens)[0]
    packed = model(tokens, positions=positions, document_ids=documents)[0]
    torch.testing.assert_close(packed[1], plain[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, 5:], model(tokens[:1, 5:])[0][0], atol=1e-5, rtol=0)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.grad_checkpointing = flag
        model(tokens, tokens, positions=positions, document_ids=documents)[1].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scaling", ["none", "linear", "dynamic", "yarn"])
def test_extend_context_keeps_the_weights_and_scales_rope(scaling):
    from model import extend_context
    model = tiny_model(max_seq_len=32)
    longer = extend_context(model, 80, scaling)
    assert longer.cfg.max_seq_len == 80 and longer.extended_from == 32
    expected = {"none": None, "linear": {"rope_type": "linear", "factor": 2.5},
                "dynamic": {"rope_type": "dynamic", "factor": 2.5, "original_max_position_embeddings": 32},
                "yarn": {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 32}}[scaling]
    assert longer.cfg.rope_scaling == expected
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), longer.state_dict().values()))
    with torch.no_grad():  # runs past the trained length
        assert longer(torch.randint(0, 97, (1, 80)))[0].shape == (1, 80, 97)
    with pytest.raises(ModelError, match="above the model's 80 tokens"):
        extend_context(longer, 64, "yarn")
    if scaling != "none":
        with pytest.raises(ModelError, match="scaled already"):
            extend_context(longer, 160, "yarn")


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"n_experts": 4, "moe_hidden_dim": 40, "n_shared_experts": 1,
                                            "shared_expert_gate": True}])
def test_every_fast_decoding_path_gives_the_plain_greedy_tokens(monkeypatch, overrides):
    """64 greedy tokens on several prompts: eager inference (oneDNN's products, only the cache's filled part read)
    and compiled decoding (products written as sums, attention written out; a mixture runs every expert weighted 0
    or its router's weight) against the plain path (BLAS's products through F.linear); int8 weights compiled against
    int8 eager."""
    import model as model_module
    from quantize import quantize_model
    model = tiny_model(max_seq_len=128, **overrides)
    spread_weights(model)
    prompts = [[5, 17, 3], list(range(1, 30)), [42, 42, 7]]

    def greedy(m):
        return [m.generate(p, max_new_tokens=64, temperature=0) for p in prompts]
    with monkeypatch.context() as plain:
        plain.setattr(model_module, "ONEDNN", False)
        reference = greedy(model)
    assert len({tuple(t) for t in reference}) == 3 and all(len(set(t)) > 8 for t in reference)
    assert greedy(model) == reference
    int8 = quantize_model(copy.deepcopy(model))
    int8_eager = greedy(int8)
    assert greedy(compile_decoding(model)) == reference
    assert greedy(compile_decoding(int8)) == int8_eager


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_gives_the_full_loss_and_gradients(monkeypatch, tie):
    """Logits past LOSS_CHUNK_BYTES: the loss a chunk of rows at a time (here 7 rows of 40, the last chunk short),
    with loss weights and ignored targets, equals the whole computation in fp32, and so do all gradients."""
    import model as model_module
    model = tiny_model(tie_embeddings=tie).train()
    tokens, targets = torch.randint(0, 97, (2, 20)), torch.randint(0, 97, (2, 20))
    targets[0, :5] = -100
    weight = torch.rand(2, 20) * 3

    def loss_and_grads():
        model.zero_grad()
        logits, loss = model(tokens, targets=targets, loss_weight=weight)
        loss.backward()
        return logits, loss.detach(), [p.grad.clone() for p in model.parameters()]
    full_logits, full, full_grads = loss_and_grads()
    monkeypatch.setattr(model_module, "LOSS_CHUNK_BYTES", 7 * 97 * 4)
    logits, chunked, grads = loss_and_grads()
    assert full_logits is not None and logits is None
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert model(tokens, targets=targets, keep_logits=True)[0] is not None


def test_chunked_loss_never_holds_the_whole_logits():
    """The peak of a training step's forward and backward, over the bytes of tensors alive, falls by at least the
    batch's float32 logits and their gradient when the loss is chunked."""
    import model as model_module
    from bench import PeakMemory
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=8192, max_seq_len=256))
    tokens = torch.randint(0, 8192, (4, 256))
    logits_bytes = 4 * tokens.numel() * 8192  # 32 MiB

    def peak(chunk_bytes):
        model_module.LOSS_CHUNK_BYTES = chunk_bytes
        with PeakMemory() as meter:
            model(tokens, targets=tokens)[1].backward()
        return meter.peak
    saved = model_module.LOSS_CHUNK_BYTES
    try:
        full, chunked = peak(2**40), peak(2**20)
    finally:
        model_module.LOSS_CHUNK_BYTES = saved
    assert full - chunked > 2 * logits_bytes, (full, chunked)


def test_target_logprobs_chunked_equal_the_whole_logits_at_a_temperature(monkeypatch):
    """DPO's and GRPO's log p(target): from the whole logits (log-softmax at temperature 0.7, gathered), and chunked
    (5 rows at a time), with the same gradients; 0 where the target is -100."""
    import model as model_module
    model = tiny_model().train()
    tokens, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    targets[1, :6] = -100
    logits = model(tokens)[0] / 0.7
    expected = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)

    def logprobs_and_grads():
        model.zero_grad()
        logp = model(tokens, targets=targets, target_logprobs=True, temperature=0.7)[1]
        (logp * torch.linspace(0, 1, 32).view(2, 16)).sum().backward()
        return logp.detach(), [p.grad.clone() for p in model.parameters()]
    whole, whole_grads = logprobs_and_grads()
    monkeypatch.setattr(model_module, "LOSS_CHUNK_BYTES", 5 * 97 * 4)
    chunked, grads = logprobs_and_grads()
    torch.testing.assert_close(whole, expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    assert (whole[1, :6] == 0).all()
    for a, b in zip(grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
