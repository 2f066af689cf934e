"""The decoder: cached and uncached logits agree, padding is invisible, encoder weights can seed it."""

import pytest
import torch

from personae.config import load_preset
from personae.models import PersonaeModel


def random_shift_mix(model: PersonaeModel) -> None:
    """A token shift starts as the identity: give it weight, so reading a wrong slot shows."""
    for block in model.decoder.blocks:
        torch.nn.init.normal_(block.attn.shift_mix, std=0.7)


@pytest.fixture(scope="module", params=["plain", "copy", "shift"])
def model(request) -> PersonaeModel:
    cfg = load_preset("tiny").model
    cfg.text.vocab_size, cfg.decoder.enabled, cfg.decoder.max_len = 120, True, 128
    cfg.decoder.copy = request.param == "copy"
    cfg.decoder.shift = 2 if request.param == "shift" else 0
    torch.manual_seed(0)
    model = PersonaeModel(cfg).eval()
    if model.decoder.copy is not None:  # its output is small at init: make it count
        torch.nn.init.normal_(model.decoder.copy.proj.weight, std=0.5)
    if cfg.decoder.shift:
        random_shift_mix(model)
    return model


def test_cached_decoding_matches_full_forward(model):
    torch.manual_seed(1)
    pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(0, 120, (2, 12))
    full = model.lm_logits(pixels, ids)  # (B, 12, V)
    prompt = 5
    cache = model.decoder.new_cache(2, device=torch.device("cpu"))
    logits = [model.prefill(pixels, ids[:, :prompt], torch.full((2,), prompt), cache)]
    R = model.image_prefix_length()
    for t in range(prompt, 12):
        mask = torch.ones(2, R + t + 1, dtype=torch.bool)
        logits.append(model.decode_step(ids[:, t], torch.full((2,), R + t), mask, cache))
    cached = torch.stack(logits, dim=1)  # (B, 8, V): predictions after tokens 4..11
    torch.testing.assert_close(cached, full[:, prompt - 1 :], rtol=1e-5, atol=1e-5)


def test_right_padded_prompts_decode_like_unpadded_ones(model):
    torch.manual_seed(2)
    pixels = torch.randn(2, 3, 64, 64)
    short, long = torch.randint(0, 120, (4,)), torch.randint(0, 120, (7,))
    padded = torch.zeros(2, 7, dtype=torch.long)
    padded[0, :4], padded[1] = short, long
    lengths = torch.tensor([4, 7])
    R = model.image_prefix_length()
    cache = model.decoder.new_cache(2, device=torch.device("cpu"))
    first = model.prefill(pixels, padded, lengths, cache)
    nxt = torch.tensor([5, 6])
    mask = torch.ones(2, R + 8, dtype=torch.bool)
    mask[0, R + 4 : R + 7] = False  # the padding slots of row 0
    second = model.decode_step(nxt, R + lengths, mask, cache)
    alone = model.lm_logits(pixels[:1], torch.cat([short, nxt[:1]])[None])
    torch.testing.assert_close(first[0], alone[0, 3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[0], alone[0, 4], rtol=1e-5, atol=1e-5)


def test_pooled_image_prefix_matches_cache_too():
    cfg = load_preset("tiny").model
    cfg.text.vocab_size, cfg.decoder.enabled, cfg.decoder.image_pool = 50, True, 2
    model = PersonaeModel(cfg).eval()
    assert model.image_prefix_length() == 1 + 4 * 4
    pixels, ids = torch.randn(1, 3, 64, 64), torch.randint(0, 50, (1, 6))
    cache = model.decoder.new_cache(1, device=torch.device("cpu"))
    first = model.prefill(pixels, ids, torch.tensor([6]), cache)
    torch.testing.assert_close(first, model.lm_logits(pixels, ids)[:, -1], rtol=1e-5, atol=1e-5)
    regions = model.encode_image(pixels)
    torch.testing.assert_close(model.image_prefix(pixels)[0, 1], regions[0, [1, 2, 9, 10]].mean(0))


def test_decoder_seeded_from_text_tower(model):
    model.init_decoder_from_text()
    assert torch.equal(model.decoder.tok_embed.weight, model.text.tok_embed.weight)
    assert torch.equal(model.decoder.blocks[0].attn.qkv.weight, model.text.blocks[0].attn.qkv.weight)
    assert torch.equal(model.decoder.blocks[1].mlp.fc.weight, model.text.blocks[1].mlp.fc.weight)


def test_token_shift_mixes_in_exactly_the_previous_tokens():
    """With shift 2, position t's q, k, v = sum_s mix[s] * qkv(x[t-s]); at init only mix[0] = 1."""
    from personae.models.decoder import CausalSelfAttention

    torch.manual_seed(3)
    attn, plain = CausalSelfAttention(16, 2, shift=2), CausalSelfAttention(16, 2)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if k != "shift_mix"})
    x = torch.randn(1, 5, 16)
    torch.testing.assert_close(attn(x, None), plain(x, None))  # the identity at init
    torch.nn.init.normal_(attn.shift_mix)
    qkv = attn.qkv(x)  # (1, 5, 48)
    mixed = qkv * attn.shift_mix[0]
    mixed[:, 1:] += qkv[:, :-1] * attn.shift_mix[1]
    mixed[:, 2:] += qkv[:, :-2] * attn.shift_mix[2]
    q, k, v = mixed.view(1, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(attn(x, None), attn.proj(y.transpose(1, 2).reshape(1, 5, 16)))
