"""The decoder: cached and uncached logits agree, padding is invisible, encoder weights can seed it."""

import pytest
import torch

from personae.config import load_preset
from personae.models import PersonaeModel


def random_shift_mix(model: PersonaeModel) -> None:
    """A token shift starts as the identity: give it weight, so reading a wrong slot shows."""
    for block in model.decoder.blocks:
        torch.nn.init.normal_(block.attn.shift_mix, std=0.7)


@pytest.fixture(scope="module", params=["plain", "shift"])
def model(request) -> PersonaeModel:
    cfg = load_preset("tiny").model
    cfg.text.vocab_size, cfg.decoder.enabled, cfg.decoder.max_len = 120, True, 128
    cfg.decoder.shift = 2 if request.param == "shift" else 0
    torch.manual_seed(0)
    model = PersonaeModel(cfg).eval()
    if cfg.decoder.shift:
        random_shift_mix(model)
    return model


def prefill(model: PersonaeModel, pixels, ids, mask, cache, positions=None) -> torch.Tensor:
    """(B, V) logits after the last slot of a prefill into `cache` (the engine's CausalLM calls)."""
    hidden = model.decode(model.embed_prompt(ids, pixels), positions, mask, cache)
    return model.lm_head(hidden[:, -1])


def decode_step(model: PersonaeModel, tokens, positions, mask, cache) -> torch.Tensor:
    """(B, V) logits after one new token per row."""
    return model.lm_head(model.decode(model.embed_prompt(tokens[:, None]), positions[:, None], mask, cache)[:, 0])


def test_cached_decoding_matches_full_forward(model):
    torch.manual_seed(1)
    pixels, ids = torch.randn(2, 3, 64, 64), torch.randint(0, 120, (2, 12))
    full = model.lm_logits(pixels, ids)  # (B, 12, V)
    prompt = 5
    cache = model.decoder.new_cache(2, device=torch.device("cpu"))
    logits = [prefill(model, pixels, ids[:, :prompt], None, cache)]
    R = model.image_prefix_length()
    for t in range(prompt, 12):
        mask = torch.ones(2, R + t + 1, dtype=torch.bool)
        logits.append(decode_step(model, ids[:, t], torch.full((2,), R + t), mask, cache))
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
    mask = torch.ones(2, R + 8, dtype=torch.bool)
    mask[0, R + 4 : R + 7] = False  # the padding slots of row 0
    hidden = model.decode(model.embed_prompt(padded, pixels), None, mask[:, : R + 7], cache)
    first = model.lm_head(hidden[torch.arange(2), R + lengths - 1])
    nxt = torch.tensor([5, 6])
    second = decode_step(model, nxt, R + lengths, mask, cache)
    alone = model.lm_logits(pixels[:1], torch.cat([short, nxt[:1]])[None])
    torch.testing.assert_close(first[0], alone[0, 3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[0], alone[0, 4], rtol=1e-5, atol=1e-5)
    long_alone = model.lm_logits(pixels[1:], torch.cat([long, nxt[1:]])[None])
    torch.testing.assert_close(second[1], long_alone[0, 7], rtol=1e-5, atol=1e-5)


def test_left_padded_prompts_decode_like_unpadded_ones(model):
    """Padding between the image and the prompt (a gap the token shift must step over)."""
    torch.manual_seed(4)
    pixels = torch.randn(2, 3, 64, 64)
    short, long = torch.randint(0, 120, (3,)), torch.randint(0, 120, (6,))
    padded = torch.zeros(2, 6, dtype=torch.long)
    padded[0, 3:], padded[1] = short, long
    R = model.image_prefix_length()
    mask = torch.ones(2, R + 7, dtype=torch.bool)
    mask[0, R : R + 3] = False  # row 0's padding, right after its image
    positions = torch.arange(R + 6).repeat(2, 1)
    positions[0, R:] = torch.tensor([0, 0, 0, R, R + 1, R + 2])  # row 0's tokens keep their own positions
    cache = model.decoder.new_cache(2, device=torch.device("cpu"))
    first = prefill(model, pixels, padded, mask[:, : R + 6], cache, positions)
    nxt = torch.tensor([7, 8])
    second = decode_step(model, nxt, torch.tensor([R + 3, R + 6]), mask, cache)
    alone = model.lm_logits(pixels[:1], torch.cat([short, nxt[:1]])[None])
    torch.testing.assert_close(first[0], alone[0, 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second[0], alone[0, 3], rtol=1e-5, atol=1e-5)
    whole = model.lm_logits(pixels, padded)  # the unpadded row 1 needs no mask at all
    torch.testing.assert_close(first[1], whole[1, -1], rtol=1e-5, atol=1e-5)


def test_pooled_image_prefix_matches_cache_too():
    cfg = load_preset("tiny").model
    cfg.text.vocab_size, cfg.decoder.enabled, cfg.decoder.image_pool = 50, True, 2
    model = PersonaeModel(cfg).eval()
    assert model.image_prefix_length() == 1 + 4 * 4
    pixels, ids = torch.randn(1, 3, 64, 64), torch.randint(0, 50, (1, 6))
    cache = model.decoder.new_cache(1, device=torch.device("cpu"))
    first = prefill(model, pixels, ids, None, cache)
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


def test_cached_token_shift_projects_each_token_once():
    """A cached step keeps the previous tokens' projections: one QKV projection of one position per block."""
    cfg = load_preset("tiny").model
    cfg.text.vocab_size, cfg.decoder.enabled, cfg.decoder.max_len, cfg.decoder.shift = 60, True, 64, 3
    model = PersonaeModel(cfg).eval()
    cache = model.new_cache(1, 20, device=torch.device("cpu"), dtype=torch.float32)
    prefill(model, None, torch.randint(0, 60, (1, 5)), None, cache)
    assert cache.recent_qkv is not None and cache.recent_qkv.shape == (cfg.decoder.depth, 1, 3, 3 * cfg.decoder.width)
    rows_projected = []
    hooks = [block.attn.qkv.register_forward_hook(lambda m, args, out: rows_projected.append(args[0].shape[1]))
             for block in model.decoder.blocks]
    decode_step(model, torch.tensor([3]), torch.tensor([5]), None, cache)
    for hook in hooks:
        hook.remove()
    assert rows_projected == [1] * cfg.decoder.depth


def test_shared_head_attention_equals_attention_over_the_head_copied_into_each_row():
    """Rows attending to a head stored once give what SDPA gives over [head; own slots] per row."""
    from personae.models.cache import KVCache, SharedHeads
    from personae.models.decoder import shared_head_attention

    torch.manual_seed(6)
    B, H, P, S, d = 3, 2, 5, 4, 8
    q, k, v = torch.randn(B, H, 1, d), torch.randn(B, H, S, d), torch.randn(B, H, S, d)
    head_k, head_v = torch.randn(1, 1, H, P, d), torch.randn(1, 1, H, P, d)  # (blocks, 1 row, H, P, d)
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    mask[2, ..., :2] = False  # row 2 has a padding gap in its own slots
    shared = SharedHeads([(KVCache(head_k, head_v, None, P), torch.tensor([0, 2]))])  # row 1 has no head
    got = shared_head_attention(q, k, v, mask, shared, layer=0)
    for row in range(B):
        keys, values, keep = k[row : row + 1], v[row : row + 1], mask[row : row + 1]
        if row != 1:
            keys, values = torch.cat([head_k[0], keys], dim=2), torch.cat([head_v[0], values], dim=2)
            keep = torch.cat([torch.ones(1, 1, 1, P, dtype=torch.bool), keep], dim=-1)
        expected = torch.nn.functional.scaled_dot_product_attention(q[row : row + 1], keys, values, attn_mask=keep)
        torch.testing.assert_close(got[row : row + 1], expected, rtol=1e-5, atol=1e-5)
