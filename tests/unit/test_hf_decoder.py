"""A local Hugging Face causal LM as the role-play decoder: loading, chat-template labels, training, the engine."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from personae.config import DECODER_KINDS, Config, DecoderCfg, FinetuneCfg, ModelCfg, choices_of
from personae.data.cards import CharacterCard
from personae.data.dialogues import DialogueRecord, DialogueTurn
from personae.data.hf_tokenizer import ChatTemplateBuilder, HFChatTokenizer, card_messages, prompt_builder
from personae.data.labels import IGNORE_INDEX
from personae.data.prompt import PromptTooLong, Turn
from personae.data.roleplay import RolePlayDataset, collate_roleplay
from personae.errors import DataError
from personae.models.generation import DecodeBatch, RowRequest, SamplingParams, generate
from personae.models.model import DECODERS, PersonaeModel
from personae.tasks.roleplay import RolePlayTask

WORDS = ["system", "user", "assistant", "model", "you", "are", "ann", "hello", "hi", "there", "how", "is", "it", "fine", "thanks", "the", "sea", "a", "boat", "i", "see", "blue", "sky", "and", "ok", "yes", "no", "what", "why", ".", ",", "!"]
TEMPLATES = {
    # the shapes of Llama-3's and Qwen2's (ChatML) templates, and Gemma's turn markers
    "llama": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] }}<|eot_id|>{% endfor %}"
              "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "qwen2": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "gemma3_text": ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
}
TEMPLATES["gpt2"] = TEMPLATES["qwen2"]
SPECIALS = {
    "llama": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "gpt2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "gemma3_text": ["<bos>", "<start_of_turn>", "<end_of_turn>", "<pad>"],
}


def _tokenizer(family: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer (whitespace runs are tokens) with the family's special tokens and template."""
    specials = SPECIALS[family]
    vocab = {token: i for i, token in enumerate(["[UNK]", *specials, "\n", "\n\n", " ", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+|\w+|[^\w\s]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": specials})
    if family in ("llama", "gemma3_text"):
        tok.bos_token = specials[0]
    tok.chat_template = TEMPLATES[family]
    return tok


def _folder_tokenizer(family: str) -> transformers.PreTrainedTokenizerBase:
    """The tokenizer saved with a model: transformers rebuilds a Qwen2 folder's as Qwen2's byte-level BPE, so that
    one is a byte-level BPE with no merges (one token per byte)."""
    if family != "qwen2":
        return _tokenizer(family)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = SPECIALS[family]
    vocab = {token: i for i, token in enumerate([*specials, *bytes_to_unicode().values()])}
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = TEMPLATES[family]
    return tok


def _config(family: str, vocab: int) -> transformers.PretrainedConfig:
    small = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    if family == "llama":
        return transformers.LlamaConfig(**small)
    if family == "qwen2":
        return transformers.Qwen2Config(**small)
    if family == "gemma3_text":
        return transformers.Gemma3TextConfig(**small, head_dim=8, sliding_window=256)
    return transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256)


@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2", "gemma3_text"])
def folder(request, tmp_path_factory):
    """A tiny random causal LM of one family with its tokenizer, saved to a local folder."""
    family = request.param
    path = tmp_path_factory.mktemp(family)
    tok = _folder_tokenizer(family)
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(_config(family, len(tok)))
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _model(folder, max_len: int = 256) -> PersonaeModel:
    cfg = Config().model
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, image_size=32, patch_size=8, width=32, depth=1, heads=2),
        text=dataclasses.replace(cfg.text, width=32, depth=1, heads=2, max_len=16, vocab_size=64),
        fusion=dataclasses.replace(cfg.fusion, depth=1, heads=2), embed_dim=16,
        decoder=DecoderCfg(enabled=True, kind="hf", path=str(folder), max_len=max_len))
    torch.manual_seed(1)
    return PersonaeModel(cfg).eval()


CARD = CharacterCard(name="Ann", description="a sailor", system_prompt="you are ann")
TURNS = [Turn("hello", "hi there"), Turn("how is the sea", "blue and fine"), Turn("why")]


def _prompt(tok: HFChatTokenizer, turns=TURNS) -> list[int]:
    return tok.prompt_ids(card_messages(CARD, turns))


def test_the_registry_has_the_config_choices():
    assert tuple(DECODERS) == DECODER_KINDS == choices_of(DecoderCfg, "kind")
    assert isinstance(ModelCfg().decoder.kind, str) and ModelCfg().decoder.kind == "own"


def test_greedy_tokens_equal_hf_generate(folder):
    model, tok = _model(folder), HFChatTokenizer(folder)
    prompt = _prompt(tok)
    ours = generate(model, tok, [prompt], None, SamplingParams(max_new_tokens=16)).pop()
    lm = model.decoder.lm
    with torch.no_grad():
        theirs = lm.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=16, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    new = theirs[0, len(prompt):].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    assert ours.token_ids == new and len(new) > 0


def test_batched_rows_with_images_equal_lone_rows_and_hf_on_the_embeddings(folder):
    model, tok = _model(folder), HFChatTokenizer(folder)
    prompts = [_prompt(tok), _prompt(tok, TURNS[2:]), _prompt(tok, TURNS[1:])]
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 32, 32)
    params = SamplingParams(max_new_tokens=10)
    batched = [g.token_ids for g in generate(model, tok, prompts, pixels, params)]
    alone = [generate(model, tok, [p], pixels[i : i + 1], params)[0].token_ids for i, p in enumerate(prompts)]
    assert batched == alone
    with torch.no_grad():  # the image prefix as embeddings, through HF generate
        embeds = model.embed_prompt(torch.tensor([prompts[1]]), pixels[1:2])
        theirs = model.decoder.lm.generate(inputs_embeds=embeds, do_sample=False, max_new_tokens=10,
                                           eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0].tolist()
    assert alone[1] == (theirs[: theirs.index(tok.eos_id)] if tok.eos_id in theirs else theirs)


def test_seeded_sampling_with_every_option_is_the_same_alone_or_batched(folder):
    model, tok = _model(folder), HFChatTokenizer(folder)
    prompts = [_prompt(tok), _prompt(tok, TURNS[2:])]
    options = {"max_new_tokens": 12, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.2,
               "max_repeats": 2}
    batched = [g.token_ids for g in generate(model, tok, prompts, None, SamplingParams(**options, seed=5))]
    alone = [generate(model, tok, [p], None, SamplingParams(**options, seed=5 + i))[0].token_ids
             for i, p in enumerate(prompts)]
    assert batched == alone and batched[0] != generate(model, tok, prompts[:1], None,
                                                       SamplingParams(**options, seed=6))[0].token_ids


def test_a_saved_state_dict_loads_into_a_fresh_model_with_the_same_logits(folder):
    model = _model(folder)
    with torch.no_grad():
        model.decoder.image_proj[0].weight.add_(1.0)  # trained parts differ from a fresh build
        next(model.decoder.lm.parameters()).add_(0.5)
        ids, pixels = torch.tensor([[3, 4, 5, 6]]), torch.randn(1, 3, 32, 32)
        before = model.lm_logits(pixels, ids)
        fresh = _model(folder)
        assert not torch.allclose(fresh.lm_logits(pixels, ids), before)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh.lm_logits(pixels, ids), before)


def test_rows_joining_mid_decode_share_a_cached_head_and_equal_lone_rows(folder):
    """Continuous batching: padding gaps, the prefix cache (a copied head) and compaction at max_positions."""
    tok = HFChatTokenizer(folder)
    prompts = [_prompt(tok), _prompt(tok, TURNS[1:]), _prompt(tok, TURNS[2:])]
    model = _model(folder, max_len=len(prompts[0]) + 30)  # the rows fill max_positions: a compaction
    head = len(tok.encode(tok.render(card_messages(CARD, [])[:1])))  # the system message: shared by all three
    assert all(p[:head] == prompts[0][:head] for p in prompts)
    params = SamplingParams(max_new_tokens=40)
    alone = [generate(model, tok, [p], None, params)[0] for p in prompts]
    batch = DecodeBatch(model, tok, prefix_cache_bytes=1 << 20, max_rows=4)
    requests = [RowRequest(p, None, params, seed=0, head_len=head) for p in prompts]
    rows = batch.join(requests[:1])
    for step in range(30):
        if step == 3:
            rows += batch.join(requests[1:])
        batch.sample()
        batch.leave([not r.finish for r in batch.rows])
        if not batch.rows:
            break
        batch.forward()
    while batch.rows:
        batch.sample()
        batch.leave([not r.finish for r in batch.rows])
        if batch.rows:
            batch.forward()
    assert [r.generation().token_ids for r in rows] == [g.token_ids for g in alone]
    assert (batch.prefixes.misses, batch.prefixes.hits) == (1, 1)  # the head computed once, reused by the two joining
    assert batch.compactions >= 1  # rows reached max_positions and the gaps were squeezed out
    assert not model.supports_shared_heads


def test_a_fine_tune_step_on_the_role_play_data_set_lowers_the_reply_loss(folder):
    model, tok = _model(folder), HFChatTokenizer(folder)
    records = [DialogueRecord("c1", "ann", (DialogueTurn("hello", "hi there"), DialogueTurn("how is the sea", "blue"))),
               DialogueRecord("c2", "ann", (DialogueTurn("why", "the sea is blue"),))]
    data = RolePlayDataset(records, {"ann": CARD}, tok, image_size=32, max_tokens=200, progress=False)
    assert data.examples[1] == tok.example(card_messages(CARD, [Turn("why", "the sea is blue")]))
    batch = collate_roleplay([data[0], data[1]], tok.pad_id)
    task = RolePlayTask(model.train(), FinetuneCfg())
    optimiser = torch.optim.AdamW(model.decoder.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = task(batch)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_the_chat_template_builder_drops_the_oldest_turns_to_fit(tmp_path):
    _tokenizer("qwen2").save_pretrained(tmp_path)
    tok = HFChatTokenizer(tmp_path)
    builder = prompt_builder(tok)
    assert isinstance(builder, ChatTemplateBuilder)
    whole = builder.build(CARD, TURNS, max_tokens=1000)
    assert whole.ids == _prompt(tok) and set(whole.labels) == {IGNORE_INDEX} and whole.dropped_turns == 0
    cut = builder.build(CARD, TURNS, max_tokens=len(whole.ids) - 1)
    assert cut.dropped_turns == 1 and cut.ids == _prompt(tok, TURNS[1:])
    with pytest.raises(PromptTooLong):
        builder.build(CARD, TURNS, max_tokens=len(_prompt(tok, TURNS[2:])) - 1)


def _labelled(tok: HFChatTokenizer, messages) -> list[tuple[str, bool]]:
    ids, labels = tok.example(messages)
    assert len(ids) == len(labels)
    return [(tok.hf.convert_ids_to_tokens(i), lab != IGNORE_INDEX) for i, lab in zip(ids, labels)]


def _by_hand(marked: str) -> list[tuple[str, bool]]:
    """'a·[·b·c·]·d' -> tokens a b c d with b and c labelled ('·' separates tokens)."""
    out, labelled = [], False
    for piece in marked.split("·"):
        if piece == "[":
            labelled = True
        elif piece == "]":
            labelled = False
        else:
            out.append((piece, labelled))
    return out


MESSAGES = [{"role": "system", "content": "you are ann"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "why"},
            {"role": "assistant", "content": "blue sky"}]


def test_reply_labels_cover_the_assistant_spans_llama3_style(tmp_path):
    _tokenizer("llama").save_pretrained(tmp_path)
    tok = HFChatTokenizer(tmp_path)
    head = "<|start_header_id|>·{}·<|end_header_id|>·\n\n"
    expected = ("<|begin_of_text|>·" + head.format("system") + "·you· ·are· ·ann·<|eot_id|>·"
                + head.format("user") + "·hi·<|eot_id|>·" + head.format("assistant")
                + "·[·hello· ·there·<|eot_id|>·]·" + head.format("user") + "·why·<|eot_id|>·"
                + head.format("assistant") + "·[·blue· ·sky·<|eot_id|>·]")
    assert _labelled(tok, MESSAGES) == _by_hand(expected)
    assert tok.eos_id == tok.hf.convert_tokens_to_ids("<|eot_id|>")


def test_reply_labels_cover_the_assistant_spans_qwen2_style(tmp_path):
    _tokenizer("qwen2").save_pretrained(tmp_path)
    tok = HFChatTokenizer(tmp_path)
    expected = ("<|im_start|>·system·\n·you· ·are· ·ann·<|im_end|>·\n·<|im_start|>·user·\n·hi·<|im_end|>·\n·"
                "<|im_start|>·assistant·\n·[·hello· ·there·<|im_end|>·]·\n·<|im_start|>·user·\n·why·<|im_end|>·\n·"
                "<|im_start|>·assistant·\n·[·blue· ·sky·<|im_end|>·]·\n")
    assert _labelled(tok, MESSAGES) == _by_hand(expected)
    assert tok.eos_id == tok.hf.convert_tokens_to_ids("<|im_end|>")
    # the prompt of the last reply is tokenized as in training
    ids, labels = tok.example(MESSAGES)
    prompt = tok.prompt_ids(MESSAGES[:4])
    assert ids[: len(prompt)] == prompt and labels[len(prompt)] != IGNORE_INDEX


def test_bad_folders_name_the_folder_and_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="model.decoder.path is empty"):
        _model("")
    with pytest.raises(DataError, match="no config.json") as error:
        _model(tmp_path)
    assert str(tmp_path) in str(error.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    with pytest.raises(DataError, match="'clip_vision_model' in config.json is not a causal LM"):
        _model(tmp_path)
    tok = _tokenizer("qwen2")
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(DataError, match="no chat template") as error:
        HFChatTokenizer(tmp_path / "tok")
    assert str(tmp_path / "tok") in str(error.value)
