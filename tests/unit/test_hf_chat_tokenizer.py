"""The HF chat tokenizer in a run: saved and loaded as one file, Tokenizer.encode's keywords, the card's shared head."""

from __future__ import annotations

import json

import pytest

from personae.data.cards import CharacterCard
from personae.data.hf_tokenizer import ChatTemplateBuilder, HFChatTokenizer, card_messages
from personae.data.prompt import Turn
from personae.data.tokenizer import train_tokenizer
from personae.errors import DataError
from personae.models.io import CheckpointError, caption_tokenizer, load_tokenizer
from tests.conftest import micro_config
from tests.hf_folders import llama_folder

WORDS = ["you", "are", "ann", "a", "sailor", "hello", "hi", "there", "the", "sea", "is", "blue", "why", ".", "?", ":"]
CARD = CharacterCard(name="Ann", description="a sailor", system_prompt="you are ann")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> HFChatTokenizer:
    return HFChatTokenizer(llama_folder(tmp_path_factory.mktemp("llama"), WORDS))


def test_a_saved_chat_tokenizer_loads_with_the_same_ids_template_and_caption_tokenizer(tokenizer, tmp_path):
    captions = train_tokenizer(["the sea is blue"] * 10, vocab_size=280)
    tokenizer.text_tokenizer = captions
    tokenizer.save(tmp_path / "chat_tokenizer.json")
    loaded = HFChatTokenizer.load(tmp_path / "chat_tokenizer.json", text_tokenizer=captions)
    messages = card_messages(CARD, [Turn("hello", "hi there."), Turn("why?")])
    assert loaded.prompt_ids(messages) == tokenizer.prompt_ids(messages)
    assert loaded.example(messages[:3]) == tokenizer.example(messages[:3])
    assert (loaded.eos_id, loaded.pad_id) == (tokenizer.eos_id, tokenizer.pad_id)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert caption_tokenizer(loaded) is captions and caption_tokenizer(captions) is captions
    assert loaded.folder == tmp_path / "chat_tokenizer.json"


def test_a_damaged_or_hostile_saved_tokenizer_is_refused_naming_the_file(tokenizer, tmp_path):
    path = tmp_path / "chat_tokenizer.json"
    tokenizer.save(path)
    saved = json.loads(path.read_text())
    saved["files"]["../escape.json"] = {"text": "{}"}
    path.write_text(json.dumps(saved))
    with pytest.raises(DataError, match="not a saved chat tokenizer .*bad file name") as error:
        HFChatTokenizer.load(path)
    assert str(path) in str(error.value) and not (tmp_path / "escape.json").exists()
    path.write_text("{")
    with pytest.raises(DataError, match="not a saved chat tokenizer"):
        HFChatTokenizer.load(path)


def test_encode_takes_the_keywords_the_server_passes(tokenizer):
    eot, bos = tokenizer.eos_id, tokenizer.hf.bos_token_id
    assert tokenizer.encode("<|eot_id|>hi") == [eot, tokenizer.hf.convert_tokens_to_ids("hi")]
    assert eot not in tokenizer.encode("<|eot_id|>hi", parse_special=False)  # the marker as plain text
    assert tokenizer.encode("hi there", add_cls=True, add_eos=True) == [bos, *tokenizer.encode("hi there"), eot]
    body = tokenizer.encode("hi there the sea")
    assert tokenizer.encode("hi there the sea", add_cls=True, max_length=3) == [bos, *body[:2]]
    assert {bos, eot} <= tokenizer.special_ids
    assert tokenizer.id_to_token(eot) == "<|eot_id|>" and tokenizer.id_to_token(10**6) is None


def test_prompts_of_one_card_share_a_head_the_length_of_its_system_message(tokenizer):
    builder = ChatTemplateBuilder(tokenizer)
    one = builder.build(CARD, [Turn("hello")], max_tokens=500)
    two = builder.build(CARD, [Turn("hi", "hello there."), Turn("why is the sea blue?")], max_tokens=500)
    head = one.segments["definition"]
    assert head == two.segments["definition"] > 0 and one.segments["examples"] == 0
    assert one.ids[:head] == two.ids[:head]
    system = tokenizer.encode(tokenizer.render(card_messages(CARD, [])))
    assert one.ids[:head] == system[:head] and head >= len(system) - 1


def test_a_run_with_an_hf_decoder_but_no_chat_tokenizer_says_what_is_missing(tmp_path):
    train_tokenizer(["the sea is blue"] * 10, vocab_size=280).save(tmp_path / "tokenizer.json")
    cfg = micro_config("model.decoder.enabled=true", "model.decoder.kind=hf", "model.decoder.path=/somewhere")
    with pytest.raises(CheckpointError, match="chat_tokenizer.json: missing; the run's decoder is a Hugging Face LM"):
        load_tokenizer(tmp_path, cfg)
    with pytest.raises(DataError, match="model.decoder.path is empty"):
        HFChatTokenizer("")
