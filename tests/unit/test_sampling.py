"""The engine's next-token pipeline: cached = uncached, seeded reproducibility, batch invariance,
top-k/top-p support, repetition penalty, loop breaking, stop strings and streaming hold-back."""

import pytest
import torch

from personae.models.generation import DecodeBatch, Row, RowRequest, SamplingParams, generate, stream_batch
from personae.models.next_token import apply_repetition_penalty, ban_loops, choose_tokens, filter_top_k_top_p


def _greedy_uncached(model, pixels, prompt, steps, eos):
    ids = list(prompt)
    for _ in range(steps):
        token = int(model.lm_logits(pixels, torch.tensor([ids]))[0, -1].argmax())
        if token == eos:
            break
        ids.append(token)
    return ids[len(prompt):]


def test_cached_greedy_equals_uncached(tiny_lm):
    model, tok = tiny_lm
    pixels = torch.randn(1, 3, 64, 64)
    prompt = tok.encode("ahoy there", max_length=20)
    out = generate(model, tok, [prompt], pixels, SamplingParams(max_new_tokens=20))[0]
    assert out.token_ids == _greedy_uncached(model, pixels, prompt, 20, tok.eos_id)


def test_seeded_sampling_is_reproducible_and_batch_invariant(tiny_lm):
    model, tok = tiny_lm
    pixels = torch.randn(3, 3, 64, 64)
    prompts = [tok.encode(t, max_length=20) for t in ("ahoy", "I spy two dogs", "fair winds")]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    batched = generate(model, tok, prompts, pixels, params)
    assert [g.token_ids for g in batched] == [g.token_ids for g in generate(model, tok, prompts, pixels, params)]
    alone = generate(model, tok, prompts[1:2], pixels[1:2], SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert alone[0].token_ids == batched[1].token_ids  # row i uses seed + i
    other = generate(model, tok, prompts, pixels, SamplingParams(max_new_tokens=12, temperature=1.0, seed=99))
    assert [g.token_ids for g in other] != [g.token_ids for g in batched]


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isfinite(filter_top_k_top_p(logits, top_k=2)).tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.64, 0.23, 0.09, ...
    kept = torch.isfinite(filter_top_k_top_p(logits, top_p=0.8))[0]
    assert kept.tolist() == [True, True, False, False, False] and probs[:1].sum() < 0.8 <= probs[:2].sum()
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=0.5))[0].tolist() == [True, False, False, False, False]


def test_sampled_tokens_stay_in_the_top_k(tiny_lm):
    model, tok = tiny_lm
    params = SamplingParams(max_new_tokens=1, temperature=5.0, top_k=3)
    pixels = torch.randn(1, 3, 64, 64)
    prompt = tok.encode("ahoy", max_length=10)
    batch = DecodeBatch(model, tok)
    batch.join([RowRequest(prompt, pixels[0], params, seed=0)])
    top3 = set(batch.logits[0].topk(3).indices.tolist())
    for seed in range(10):
        params.seed = seed
        assert generate(model, tok, [prompt], pixels, params)[0].token_ids[0] in top3 | {tok.eos_id}


def test_top_k_and_top_p_apply_per_row():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]] * 3)
    kept = torch.isfinite(filter_top_k_top_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.5, 1.0])))
    assert kept.tolist() == [[True, True, False, False, False], [True, False, False, False, False], [True] * 5]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    per_row = apply_repetition_penalty(logits.repeat(2, 1), seen.repeat(2, 1), torch.tensor([2.0, 1.0]))
    assert per_row.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 1.0]]  # penalty 1.0 leaves its row alone


def test_stop_strings_cut_and_hold_back(tiny_lm):
    _, tok = tiny_lm
    params = SamplingParams(stop=["fair winds"])
    row = Row(RowRequest([1], None, params, seed=0, stream=True), tok, max_new=params.max_new_tokens)
    pieces = []
    for token in tok.encode("I spy dogs. fair winds! more", add_cls=False):
        row.push(token)
        pieces.append(row.new_text())
        if row.finish:
            break
    assert row.finish == "stop" and row.text == "I spy dogs. "
    assert "".join(pieces) == "I spy dogs. " and not any("fair" in p for p in pieces)


def test_streaming_pieces_join_to_the_full_text(tiny_lm):
    model, tok = tiny_lm
    pixels = torch.randn(2, 3, 64, 64)
    prompts = [tok.encode("ahoy", max_length=10), tok.encode("two dogs on the", max_length=10)]
    params = SamplingParams(max_new_tokens=15, temperature=0.8, seed=3)
    streamed = ["", ""]
    for pieces in stream_batch(model, tok, prompts, pixels, params):
        streamed = [a + b for a, b in zip(streamed, pieces)]
    assert streamed == [g.text for g in generate(model, tok, prompts, pixels, params)]


def loop_breakers(ids: list[int], max_repeats: int) -> set[int]:
    """The tokens ban_loops refuses after one row's `ids` (history as the engine keeps it)."""
    width = 8 * max_repeats
    history = torch.full((1, width), -1, dtype=torch.long)
    if ids and width:
        history[0, -min(width, len(ids)):] = torch.tensor(ids[-width:])
    banned = ban_loops(torch.zeros(1, 10), history, torch.tensor([len(ids)]), torch.tensor([max_repeats]))
    return set(torch.isinf(banned[0]).nonzero()[:, 0].tolist())


def test_loop_breakers_refuse_only_the_repeat_beyond_the_limit():
    assert loop_breakers([9, 1, 2, 1, 2, 1, 2], 3) == {1}  # "-ho" three times: a fourth may not start
    assert loop_breakers([9, 1, 2, 1, 2], 3) == set()  # twice is allowed ("blub blub")
    assert loop_breakers([7, 7, 7], 3) == {7} and loop_breakers([7, 7], 3) == set()  # "Hmmm" but no "Hmmmm"
    assert loop_breakers([4, 5, 6, 4, 5, 6], 2) == {4}
    assert loop_breakers([1, 2, 3, 1, 2], 2) == set()  # a word used earlier is not a loop
    assert loop_breakers([3, 1, 2, 3], 1) == {1, 2, 3}  # one use is the limit: none of the last 8 may start again
    assert loop_breakers([], 3) == set() and loop_breakers([5, 5, 5], 0) == set()


def test_loop_breaking_applies_each_rows_own_limit():
    history = torch.tensor([[-1, -1, 3, 3, 3, 3], [-1, -1, 3, 3, 3, 3], [-1, 1, 2, 1, 2, 1]])
    banned = ban_loops(torch.zeros(3, 10), history, torch.tensor([4, 4, 5]), torch.tensor([3, 0, 2]))
    assert banned[0, 3] == float("-inf") and torch.isfinite(banned[0, :3]).all()  # 3 x "3": no fourth
    assert torch.isfinite(banned[1]).all()  # max_repeats 0: off
    assert torch.isinf(banned[2]).nonzero()[:, 0].tolist() == [2]  # "... 2 1 2 1": "2 1" twice, no third


def test_greedy_decoding_with_max_repeats_never_loops(tiny_lm):
    model, tok = tiny_lm  # an untrained model: greedy replies repeat themselves
    pixels = torch.randn(2, 3, 64, 64)
    prompts = [tok.encode(t, max_length=20) for t in ("ahoy", "I spy two dogs")]
    plain = generate(model, tok, prompts, pixels, SamplingParams(max_new_tokens=40))
    capped = generate(model, tok, prompts, pixels, SamplingParams(max_new_tokens=40, max_repeats=2))

    def longest_run(ids):
        return max((r for n in range(1, 9) for i in range(len(ids)) for r in range(1, len(ids) // n + 1)
                    if ids[i: i + n * r] == ids[i: i + n] * r), default=0)

    assert max(longest_run(g.token_ids) for g in plain) > 2
    assert all(longest_run(g.token_ids) <= 2 for g in capped)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(top_k=-2),
                                 dict(max_repeats=-1)])
def test_bad_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_sampled_frequencies_follow_the_softmax():
    """Inverse-CDF draws from a row's generator: each token as often as softmax(logits / T) says, never a filtered one."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    uniform = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    everyone = torch.arange(4000)
    temperature, top_k, top_p = torch.full((4000,), 2.0), torch.zeros(4000, dtype=torch.long), torch.ones(4000)
    tokens = choose_tokens(logits, temperature, top_k, top_p, everyone, uniform)
    frequencies = torch.bincount(tokens, minlength=4).float() / 4000
    torch.testing.assert_close(frequencies, (logits[0] / 2.0).softmax(-1), atol=0.02, rtol=0)
    capped = choose_tokens(logits, temperature, torch.full((4000,), 2), top_p, everyone, uniform)
    assert set(capped.tolist()) == {0, 1}
    greedy_row = choose_tokens(logits[:2], torch.tensor([0.0, 2.0]), top_k[:2], top_p[:2], torch.tensor([1]),
                               torch.tensor([0.999]))
    assert greedy_row.tolist() == [0, 3]  # row 0 greedy; row 1's uniform lies in the last token's share


def test_rows_join_into_spare_rows_and_leave_in_place_with_exact_tokens(tiny_lm):
    """A third row joins the running batch's spare cache rows (no new cache), rows leave by moving
    the last row into the hole, and every row still gets exactly the tokens it gets alone."""
    model, tok = tiny_lm
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    prompts = [tok.encode(t, max_length=20) for t in ("I spy two dogs on the beach", "ahoy there", "fair")]
    lengths = [12, 3, 8]  # row 1 leaves first, while rows 0 and 2 go on
    requests = [RowRequest(p, pixels[i], SamplingParams(max_new_tokens=lengths[i], temperature=1.0), seed=10 + i)
                for i, p in enumerate(prompts)]
    alone = [generate(model, tok, [p], pixels[i: i + 1], SamplingParams(max_new_tokens=lengths[i], temperature=1.0,
                                                                      seed=10 + i))[0].token_ids
             for i, p in enumerate(prompts)]
    batch = DecodeBatch(model, tok, max_rows=8)
    rows = batch.join(requests[:1])
    batch.sample()
    batch.forward()
    rows += batch.join(requests[1:2])  # a new cache with spare rows
    store = batch.store
    batch.sample()
    batch.forward()
    rows += batch.join(requests[2:])  # fits: written into a spare row
    assert batch.store is store and batch.store.rows > len(batch.rows)
    while batch.rows:
        batch.sample()
        batch.leave([not row.finish for row in batch.rows])
        assert batch.store is store or not batch.rows  # leaving copies no cache
        if batch.rows:
            batch.forward()
    assert [row.ids for row in rows] == alone
    assert [len(ids) for ids in alone] == lengths  # no end token cut a row short, so row 1 did leave first


class BigramLM(torch.nn.Module):
    """A second decoder family in a few lines (the engine's CausalLM protocol): logits from the last token only."""

    max_positions = 64

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def image_prefix_length(self) -> int:
        return 0

    def embed_prompt(self, input_ids, pixel_values=None):
        return self.table(input_ids)

    def decode(self, embeddings, positions, attention_mask, cache):
        cache.length += embeddings.shape[1]  # nothing to remember: a bigram model needs no keys
        return embeddings

    def lm_head(self, hidden):
        return hidden

    def new_cache(self, batch, slots, *, device, dtype):
        from personae.models.cache import KVCache

        return KVCache.empty(1, batch, 1, slots, 1, device=device, dtype=dtype)


def test_another_decoder_family_decodes_through_the_same_engine(tiny_lm):
    _, tok = tiny_lm
    torch.manual_seed(5)
    lm = BigramLM(tok.vocab_size).eval()
    follow = lm.table.weight.argmax(-1)  # the greedy successor of every token
    prompts = [[5, 9, 12], [7]]
    replies = generate(lm, tok, prompts, None, SamplingParams(max_new_tokens=6))
    for prompt, reply in zip(prompts, replies):
        expected, token = [], prompt[-1]
        for _ in range(6):
            token = int(follow[token])
            if token == tok.eos_id:
                break
            expected.append(token)
        assert reply.token_ids == expected
