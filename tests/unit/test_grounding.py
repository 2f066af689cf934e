"""The grounding diagnosis: attention weights are the ones the decoder uses, word kinds, the loss table's machinery."""

from __future__ import annotations

import json

import pytest
import torch

from personae.config import DecoderCfg
from personae.data.dialogues import read_dialogues
from personae.data.kinds import open_data
from personae.errors import DataError
from personae.eval.grounding import (
    IMAGES,
    OTHER,
    WordKinds,
    evaluate_grounding,
    format_grounding_table,
    shuffled_images,
    worth_line,
)
from personae.models.decoder import Decoder, token_shift
from personae.world.metrics import world_word_kinds

WORLD_KINDS = ("object names", "numbers", "yes/no", "positions", "setting", "persona words", OTHER)


def tiny_decoder(shift: int) -> Decoder:
    torch.manual_seed(0)
    decoder = Decoder(DecoderCfg(enabled=True, width=16, depth=2, heads=2, max_len=32, shift=shift), 50, 8).eval()
    if shift:
        for block in decoder.blocks:
            torch.nn.init.normal_(block.attn.shift_mix, std=0.7)
    return decoder


def test_attention_weights_are_a_hand_written_causal_softmax():
    decoder = tiny_decoder(shift=0)
    embeddings = torch.randn(2, 7, 16)
    hidden, weights = decoder.forward_with_attention(embeddings)
    assert torch.equal(hidden, decoder(embeddings)) and len(weights) == 2
    x = embeddings + decoder.pos_embed[:, :7]
    block = decoder.blocks[0]
    q, k, _ = block.attn.qkv(block.ln_1(x)).split(16, dim=-1)
    q, k = (t.view(2, 7, 2, 8).transpose(1, 2) for t in (q, k))  # (B, H, T, d)
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(weights[0], scores.softmax(-1))
    assert torch.allclose(weights[1].sum(-1), torch.ones(2, 2, 7)) and weights[1].triu(1).abs().max() == 0


def test_attention_weights_with_a_token_shift_reproduce_the_blocks_output():
    decoder = tiny_decoder(shift=2)
    embeddings = torch.randn(2, 9, 16)
    caught = {}
    hooks = [block.attn.register_forward_hook(
        lambda module, args, output, i=i: caught.update({i: (args[0], output)})) for i, block in
        enumerate(decoder.blocks)]
    _, weights = decoder.forward_with_attention(embeddings)
    for hook in hooks:
        hook.remove()
    for i, block in enumerate(decoder.blocks):
        x, output = caught[i]
        qkv, _ = token_shift(block.attn.qkv(x), block.attn.shift_mix, None, None)
        v = qkv[..., 32:].view(2, 9, 2, 8).transpose(1, 2)  # the shifted values
        mixed = (weights[i] @ v).transpose(1, 2).reshape(2, 9, 16)
        torch.testing.assert_close(block.attn.proj(mixed), output)


def test_word_kinds_tag_tokens_longest_phrase_first(pretrained_run):
    from personae.models.io import load_model

    _, _, tokenizer = load_model(pretrained_run)
    kinds = WordKinds({"object names": ("dog", "dogs", "roller skate"), "numbers": ("two",),
                       "positions": ("top left", "top"), "setting": ("beach",), "yes/no": ("yes",)})
    text = "Two dogs at the top left on the beach, yes. A roller skate!"
    ids = tokenizer.encode(text, add_cls=False, parse_special=False)
    tagged = kinds.of_tokens(tokenizer, ids)
    assert len(tagged) == len(ids)
    words = {}
    for token, kind in zip(ids, tagged):
        words.setdefault(kind, []).append(tokenizer.decode([token]).strip().lower())
    assert "".join(words["object names"]) == "dogsrollerskate"
    assert "".join(words["positions"]) == "topleft" and "".join(words["numbers"]) == "two"
    assert "".join(words["setting"]) == "beach" and "".join(words["yes/no"]) == "yes"
    assert "the" in "".join(words[OTHER])


def test_world_word_kinds_own_each_word_once():
    from personae.world.characters import CHARACTERS

    kinds = world_word_kinds(CHARACTERS)
    assert tuple(kinds) == WORLD_KINDS[:-1]
    assert "roller skate" in kinds["object names"] and "two" in kinds["numbers"] and "nope" in kinds["yes/no"]
    assert "top left" in kinds["positions"] and "beach" in kinds["setting"] and "bottom" not in kinds["setting"]
    seen = [word for words in kinds.values() for word in words]
    assert len(seen) == len(set(seen))


def test_shuffled_images_never_give_a_conversation_its_own_scene(small_world):
    records = read_dialogues(small_world / "dialogues.jsonl", split="test")
    shuffle = shuffled_images(records, seed=0)
    assert all(records[j].scene_id != r.scene_id for r, j in zip(records, shuffle))
    assert shuffle == shuffled_images(records, seed=0) and shuffle != shuffled_images(records, seed=1)
    one_scene = [r for r in records if r.scene_id == records[0].scene_id]
    with pytest.raises(DataError, match="at least two scenes; raise --limit"):
        shuffled_images(one_scene, seed=0)


@pytest.fixture(scope="module")
def finetuned(pretrained_run, small_world, tmp_path_factory):
    from personae.config import apply_overrides
    from personae.models.io import load_model
    from personae.train.finetune import run_config, run_finetune

    out = tmp_path_factory.mktemp("grounding-run")
    run_finetune(pretrained_run, small_world, out, apply_overrides(run_config(pretrained_run),
                                                                  ["finetune.train.steps=3"]), progress=False)
    model, _, tokenizer = load_model(out)
    return out, model, tokenizer


def test_a_decoder_blind_to_the_image_loses_the_same_with_every_image(finetuned, small_world):
    _, model, tokenizer = finetuned
    last = model.decoder.image_proj[-1]
    saved = (last.weight.detach().clone(), last.bias.detach().clone())
    with torch.no_grad():  # the projector's output is zero: every image gives the same prefix
        last.weight.zero_()
        last.bias.zero_()
    try:
        result = evaluate_grounding(model, tokenizer, small_world, limit=4, batch_size=3, progress=False)
    finally:
        with torch.no_grad():
            last.weight.copy_(saved[0])
            last.bias.copy_(saved[1])
    rows = [result["loss"]["all"], *result["loss"]["by_kind"].values(), *result["loss"]["by_type"].values()]
    for row in rows:
        if row["n"]:
            assert row["true"] == row["shuffled"] == row["blank"], row
    assert result["loss"]["all"]["n"] == sum(row["n"] for row in result["loss"]["by_kind"].values())


def test_grounding_json_has_every_kind_and_question_type(finetuned, small_world, capsys):
    from personae.app.cli import main

    out, _, _ = finetuned
    assert main(["-q", "eval", "grounding", str(out), "--data", str(small_world), "--limit", "6"]) == 0
    result = json.loads((out / "eval" / "grounding.json").read_text())
    types = {turn.meta["type"] for r in read_dialogues(small_world / "dialogues.jsonl", split="test")[:6]
             for turn in r.turns} | {"describe", "count", "exists", "where"}
    assert set(result["kinds"]) == set(WORLD_KINDS) == set(result["loss"]["by_kind"])
    assert types <= set(result["loss"]["by_type"])
    assert result["loss"]["all"]["n"] > 0 and all(result["loss"]["all"][image] > 0 for image in IMAGES)
    assert result["loss"]["all"]["true"] != result["loss"]["all"]["blank"]  # the image does reach the loss
    heads = result["attention"]["all tokens"]["mass"]
    layers, width = model_shape(out)
    assert len(heads) == layers and all(len(layer) == width for layer in heads)
    assert all(0.0 < mass < 1.0 for layer in heads for mass in layer)
    assert 0.0 < result["attention"]["all tokens"]["uniform"] < 1.0
    printed = capsys.readouterr().out
    assert "object names" in printed and "attention on the" in printed
    assert worth_line(result).startswith("image worth: object names ")
    assert format_grounding_table(result).count("\n") > 10


def model_shape(run):
    from personae.models.io import load_model

    _, cfg, _ = load_model(run)
    return cfg.model.decoder.depth, cfg.model.decoder.heads


def test_every_reference_reply_of_a_built_world_scores_one(small_world):
    kind = open_data(small_world)
    for split in ("test", "val"):
        scorer = kind.reply_scorer(split)
        records = read_dialogues(small_world / "dialogues.jsonl", split=split)
        rows = [{"type": turn.meta.get("type"), "character_split": record.character_split,
                 **scorer.score(record, t, turn.reply)} for record in records for t, turn in enumerate(record.turns)]
        assert {row["character_split"] for row in rows} == {"train", "heldout"}
        wrong = [row for row in rows if any(value is not None and value < 1.0 for key, value in row.items()
                                            if key in scorer.metrics)]
        assert not wrong, wrong[:3]
        overall = scorer.aggregate(rows)["overall"]
        assert all(overall[metric] == 1.0 for metric in scorer.metrics), overall


def test_a_plain_folder_gets_the_question_types_and_all_tokens(finetuned, small_world, tmp_path):
    for name in ("dialogues.jsonl", "characters", "images"):  # the world's files without its world.json marker
        (tmp_path / name).symlink_to(small_world / name)
    _, model, tokenizer = finetuned
    result = evaluate_grounding(model, tokenizer, tmp_path, limit=3, progress=False)
    assert result["kinds"] == [] and "by_kind" not in result["loss"] and set(result["attention"]) == {"all tokens"}
    assert result["loss"]["all"]["n"] == sum(row["n"] for row in result["loss"]["by_type"].values()) > 0
    assert "object names" not in format_grounding_table(result)
    assert worth_line(result).startswith("image worth: all tokens ")


def test_content_weighting_weighs_the_answer_tokens_of_each_reply(pretrained_run):
    from personae.data.labels import IGNORE_INDEX
    from personae.data.word_kinds import ContentWeighting
    from personae.models.io import load_model

    _, _, tokenizer = load_model(pretrained_run)
    kinds = WordKinds({"object names": ("dogs",), "numbers": ("two",), "persona words": ("woof",)})
    reply = tokenizer.encode("Woof! Two dogs.", add_cls=False, parse_special=False)
    labels = [IGNORE_INDEX] * 3 + [*reply, tokenizer.eos_id] + [IGNORE_INDEX] * 2 + [*reply, tokenizer.eos_id]
    weighting = ContentWeighting(kinds, frozenset({"object names", "numbers"}), 4.0)
    weights = weighting.label_weights(tokenizer, labels)
    assert len(weights) == len(labels)
    assert [w for w, label in zip(weights, labels) if label == IGNORE_INDEX] == [0.0] * 5
    tagged = kinds.of_tokens(tokenizer, reply)
    expected = [4.0 if kind in ("object names", "numbers") else 1.0 for kind in tagged] + [1.0]
    assert weights[3 : 4 + len(reply)] == expected and weights[-len(reply) - 1 :] == expected
    assert 4.0 in expected and expected.count(4.0) < len(expected) - 1  # woof and "!" keep weight 1


def test_weighted_reply_loss_scales_each_token_and_divides_by_the_token_count():
    import torch.nn.functional as F

    from personae.data.labels import IGNORE_INDEX
    from personae.objectives import LanguageModelling

    torch.manual_seed(0)
    hidden, head = torch.randn(1, 5, 4), torch.nn.Linear(4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 5, IGNORE_INDEX, 2]])
    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0, 1.0]])
    ce = F.cross_entropy(head(hidden[0, :-1]), labels[0, 1:], reduction="none", ignore_index=IGNORE_INDEX)
    expected = (ce[0] * 1.0 + ce[1] * 3.0 + ce[3] * 1.0) / 3
    lm = LanguageModelling()
    assert lm(hidden, labels, head, weights)["loss_lm"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert lm(hidden, labels, head, torch.ones(1, 5))["loss_lm"].item() == pytest.approx(
        lm(hidden, labels, head)["loss_lm"].item(), rel=1e-6)
