"""The samplers beyond top-k / top-p, each against hand-computed logits: OpenAI's frequency / presence
penalties and logit bias, min-p, typical-p, XTC, DRY; token logprobs; a seeded row is the same alone
and batched with rows using other settings."""

import math

import pytest
import torch

from personae.models.generation import DecodeBatch, RowRequest, SamplingParams, generate
from personae.models.next_token import token_logprobs
from personae.models.samplers import (
    apply_frequency_presence,
    dry_penalties,
    dry_penalties_rows,
    exclude_top_choices,
    filter_min_p,
    filter_typical_p,
)


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 2)
    counts = torch.tensor([[0, 1, 3, 0]] * 2)
    out = apply_frequency_presence(logits, counts, torch.tensor([0.5, 0.0]), torch.tensor([0.25, -1.0]))
    # row 0: 2 - 1*0.5 - 0.25 = 1.25, 3 - 3*0.5 - 0.25 = 1.25; row 1: presence only, negative raises
    assert out.tolist() == [[1.0, 1.25, 1.25, 4.0], [1.0, 3.0, 4.0, 4.0]]


def test_min_p_keeps_tokens_at_least_min_p_times_the_top():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 2)
    kept = torch.isfinite(filter_min_p(probs.log(), torch.tensor([0.3, 0.0])))
    # 0.3 * 0.5 = 0.15: 0.15 is kept (not under the floor), 0.05 dropped; min_p 0 is off
    assert kept.tolist() == [[True, True, True, False], [True] * 4]


def test_typical_p_keeps_the_tokens_closest_to_the_entropy():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    entropy = -(probs * probs.log()).sum()  # 1.2799 nats
    distance = (-probs.log() - entropy).abs()[0]  # 0.36, 0.06, 0.33, 1.02: order 1, 2, 0, 3
    assert distance.argsort().tolist() == [1, 2, 0, 3]
    kept = torch.isfinite(filter_typical_p(probs.log(), torch.tensor([0.45])))[0]
    assert kept.tolist() == [False, True, True, False]  # 0.3 < 0.45, 0.3 + 0.2 reaches it
    kept = torch.isfinite(filter_typical_p(probs.log(), torch.tensor([0.55])))[0]
    assert kept.tolist() == [True, True, True, False]
    assert torch.isfinite(filter_typical_p(probs.log(), torch.tensor([1.0]))).all()


def test_xtc_drops_every_top_choice_but_the_least_likely():
    logits = torch.tensor([[0.45, 0.3, 0.15, 0.1]] * 3).log()
    out = exclude_top_choices(logits, torch.tensor([0.12, 0.5, 0.12]), torch.tensor([True, True, False]))
    kept = torch.isfinite(out)
    # row 0: 0.45, 0.3, 0.15 are >= 0.12, only 0.15 stays with 0.1; row 1: one token >= 0.5 -> unchanged;
    # row 2: its coin did not come up
    assert kept.tolist() == [[False, False, True, True], [True] * 4, [True] * 4]


def test_dry_penalises_the_token_that_would_extend_a_repeat():
    breakers = torch.zeros(10, dtype=torch.bool)
    context = torch.tensor([5, 6, 7, 1, 5, 6])  # "5 6" repeats; 7 followed it: match 2 = allowed_length
    pen = dry_penalties(context, breakers, multiplier=0.8, base=1.75, allowed_length=2)
    assert pen.nonzero()[:, 0].tolist() == [7] and pen[7].item() == pytest.approx(0.8)
    context = torch.tensor([5, 6, 7, 1, 5, 6, 7, 1, 5, 6])  # "5 6 7 1 5 6" matches 6 long before the second 7
    pen = dry_penalties(context, breakers, 0.8, 1.75, 2)
    assert pen[7].item() == pytest.approx(0.8 * 1.75 ** 4)
    assert pen[1].item() == 0 and pen[5].item() == 0  # 1 and 5 never follow a copy of the ending "5 6"
    breakers[1] = True  # the repeat cannot run back across token 1: "5 6" only, match 2
    assert dry_penalties(context, breakers, 0.8, 1.75, 2)[7].item() == pytest.approx(0.8)
    assert dry_penalties(context, breakers, 0.8, 1.75, 3)[7].item() == 0  # a 2-token repeat is allowed


def test_token_logprobs_are_the_log_softmax_with_the_best_alternatives():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    found = token_logprobs(logits, torch.tensor([1]), top=2)[0]
    norm = math.log(math.exp(2) + math.exp(1) + 1)
    assert found.token_id == 1 and found.logprob == pytest.approx(1 - norm)
    assert [t for t, _ in found.top] == [0, 1] and found.top[0][1] == pytest.approx(2 - norm)


def test_logit_bias_and_penalties_reach_the_engine(tiny_lm):
    model, tok = tiny_lm
    prompt = tok.encode("ahoy there", max_length=20)
    plain = generate(model, tok, [prompt], None, SamplingParams(max_new_tokens=6))[0]
    first = plain.token_ids[0]
    banned = generate(model, tok, [prompt], None, SamplingParams(max_new_tokens=6, logit_bias={first: -100}))[0]
    assert banned.token_ids[0] != first
    forced = generate(model, tok, [prompt], None, SamplingParams(max_new_tokens=3, logit_bias={17: 100}))[0]
    assert forced.token_ids == [17, 17, 17]
    batch = DecodeBatch(model, tok)
    batch.join([RowRequest(prompt, None, SamplingParams(max_new_tokens=4, frequency_penalty=0.5,
                                                        presence_penalty=0.25, logit_bias={17: 1.0}), seed=0)])
    token = int(batch.sample()[0])
    batch.forward()
    raw = batch.logits[0].float().cpu()
    out = batch.settings.penalise(raw[None].clone(), batch.counts, batch.history, batch.generated)[0]
    expected = raw.clone()
    expected[17] += 1.0
    expected[token] -= 0.5 + 0.25  # generated once
    assert torch.allclose(out, expected)
    with pytest.raises(ValueError, match="logit_bias names token 999"):
        generate(model, tok, [prompt], None, SamplingParams(max_new_tokens=2, logit_bias={999: 1.0}))
    with pytest.raises(ValueError, match="logit_bias values"):
        SamplingParams(logit_bias={1: 101.0})


def test_engine_logprobs_match_the_penalised_logits(tiny_lm):
    model, tok = tiny_lm
    prompt = tok.encode("ahoy there", max_length=20)
    params = SamplingParams(max_new_tokens=1, logprobs=True, top_logprobs=3, logit_bias={5: 2.0}, temperature=0.7,
                            seed=3)
    batch = DecodeBatch(model, tok)
    batch.join([RowRequest(prompt, None, params, seed=3)])
    logits = batch.logits[0].float().clone()
    logits[5] += 2.0  # logprobs are after the bias and penalties, before temperature
    token = int(batch.sample()[0])
    entry = batch.rows[0].logprobs[0] if token != tok.eos_id else None
    expected = logits.log_softmax(-1)
    if entry is not None:
        assert entry.token_id == token and entry.logprob == pytest.approx(float(expected[token]), abs=1e-5)
        assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()


def test_seeded_row_is_the_same_alone_and_batched_with_other_samplers(tiny_lm):
    model, tok = tiny_lm
    prompts = [tok.encode(t, max_length=20) for t in ("ahoy", "I spy two dogs", "fair winds")]
    mine = SamplingParams(max_new_tokens=12, temperature=1.0, min_p=0.05, typical_p=0.9, xtc_probability=0.5,
                          xtc_threshold=0.05, dry_multiplier=0.8, frequency_penalty=0.5, presence_penalty=0.3,
                          logit_bias={7: 1.5}, logprobs=True, top_logprobs=2)
    others = [SamplingParams(max_new_tokens=9, temperature=0.0, repetition_penalty=1.3, max_repeats=2),
              SamplingParams(max_new_tokens=15, temperature=1.5, top_k=5, top_p=0.8, presence_penalty=-1.0)]

    def run(requests):
        batch = DecodeBatch(model, tok)
        rows = batch.join(requests)
        while batch.rows:
            batch.sample()
            batch.leave([not row.finish for row in batch.rows])
            if batch.rows:
                batch.forward()
        return rows

    alone = run([RowRequest(prompts[1], None, mine, seed=11)])[0]
    together = run([RowRequest(prompts[0], None, others[0], seed=1), RowRequest(prompts[1], None, mine, seed=11),
                    RowRequest(prompts[2], None, others[1], seed=2)])[1]
    assert together.ids == alone.ids and len(alone.ids) > 0
    assert [e.token_id for e in alone.logprobs] == alone.ids
    assert [e.logprob for e in together.logprobs] == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-4)


def test_dry_rows_together_equal_each_row_alone():
    breakers = torch.zeros(2, 10, dtype=torch.bool)
    breakers[1, 1] = True
    contexts = [torch.tensor([5, 6, 7, 1, 5, 6, 7, 1, 5, 6]), torch.tensor([3, 5, 6, 7, 1, 5, 6, 7, 1, 5, 6]),
                torch.tensor([2])]
    stacked = torch.stack([breakers[0], breakers[1], breakers[0]])
    together = dry_penalties_rows(contexts, stacked, torch.tensor([0.8, 0.5, 1.0]), torch.tensor([1.75, 2.0, 1.75]),
                                  torch.tensor([2, 2, 1]))
    assert together[0, 7].item() == pytest.approx(0.8 * 1.75 ** 4) and together[1, 7].item() == pytest.approx(0.5)
    assert not together[2].any()  # one token: nothing to repeat
    for r, (m, b, a) in enumerate([(0.8, 1.75, 2), (0.5, 2.0, 2), (1.0, 1.75, 1)]):
        assert torch.equal(together[r], dry_penalties(contexts[r], stacked[r], m, b, a))
