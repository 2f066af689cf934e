"""Tests for the exact role-play metrics: references score 1, known errors score known values."""

from __future__ import annotations

import numpy as np
import pytest

from personae.world.build import assign_splits, scene_id_for
from personae.world.characters import CHARACTERS, characters_in
from personae.world.dialogues import Turn, generate_dialogues, heldout_examples
from personae.world.metrics import (
    METRICS,
    aggregate,
    foreign_markers,
    image_text_relevance,
    instruction_adherence,
    knowledge_consistency,
    parse_count,
    parse_mood,
    parse_position,
    parse_yes_no,
    persona_consistency,
    quirk_holds,
    relevance_scores,
    response_accuracy,
    score_dialogue,
    score_reply,
)
from personae.world.scene import Placed, Scene, sample_scene

PIRATE, ROBOT = CHARACTERS["captain-saltbeard"], CHARACTERS["gizmotron"]
GRANNY, DETECTIVE = CHARACTERS["granny-marigold"], CHARACTERS["inspector-holloway"]
POET = CHARACTERS["quillon-ashby"]
# two dogs in opposite corners, one car at the middle left, one rose at the top centre
SCENE = Scene("s1", "beach", [Placed("dog", "animals", 2, [(0, 0), (2, 2)]),
                              Placed("car", "vehicles", 1, [(1, 0)]),
                              Placed("rose", "plants", 1, [(0, 1)])], split="test")


def turn(qtype: str, **target: object) -> Turn:
    return Turn("?", "", qtype, dict(target))


def test_every_reference_reply_scores_one_on_every_applicable_metric() -> None:
    n = 400
    splits = assign_splits(n, (0.5, 0.25, 0.25), 0)
    scenes = []
    for index in range(n):
        scene = sample_scene(scene_id_for(index, n), np.random.default_rng([7, index]))
        scene.split = splits[index]
        scenes.append(scene)
    by_id = {s.scene_id: s for s in scenes}
    dialogues = list(generate_dialogues(scenes, seed=7))
    dialogues += [d for c in characters_in("heldout") for d in heldout_examples(c, scenes, seed=7)]
    rows = [row for d in dialogues for row in score_dialogue(d, by_id[d.scene_id], CHARACTERS)]
    assert len({row["character"] for row in rows}) == 40
    summary = aggregate(rows)
    assert summary["overall"]["n"] == len(rows)
    for metric in METRICS:
        assert summary["overall"][metric] == 1.0, metric
    assert set(summary["by_character_split"]) == {"train", "heldout"}
    imperfect = [r for r in rows if any(r[m] is not None and r[m] < 1 for m in METRICS)]
    assert not imperfect, imperfect[:3]


def test_count_accuracy() -> None:
    count_dogs = turn("count", object="dog", count=2)
    perfect = "Ahoy there, matey! I spy with me good eye two dogs. Fair winds and following seas!"
    assert response_accuracy(perfect, count_dogs, SCENE) == 1.0
    assert response_accuracy(perfect.replace("two", "three"), count_dogs, SCENE) == 0.0
    assert response_accuracy("I count 2 dogs.", count_dogs, SCENE) == 1.0
    count_cats = turn("count", object="cat", count=0)
    assert response_accuracy("There are no cats here.", count_cats, SCENE) == 1.0
    assert response_accuracy("I don't see any cats at all.", count_cats, SCENE) == 1.0
    assert response_accuracy("I spy a cat.", count_cats, SCENE) == 0.0
    assert response_accuracy("Lovely weather.", count_cats, SCENE) == 0.0  # no answer at all
    assert parse_count("Only one mouse and three mice", "mouse") == 1  # the first count wins
    with pytest.raises(ValueError, match="object"):
        response_accuracy("two", turn("count", object="unicorn"), SCENE)


def test_exists_accuracy() -> None:
    is_cat = turn("exists", object="cat", exists=False)
    assert response_accuracy("Yes! I spy with me good eye a cat.", is_cat, SCENE) == 0.0
    assert response_accuracy("No, there is no cat here, matey.", is_cat, SCENE) == 1.0
    assert response_accuracy("Nope.", is_cat, SCENE) == 1.0
    is_car = turn("exists", object="car", exists=True)
    assert response_accuracy("Yep, a car.", is_car, SCENE) == 1.0
    assert response_accuracy("I spy a car.", is_car, SCENE) == 1.0  # no yes/no: the mention counts
    assert response_accuracy("No car here.", is_car, SCENE) == 0.0
    assert response_accuracy("I spy no cats, matey.", is_cat, SCENE) == 1.0  # a counted "no cats" answers
    # neither a yes/no word nor a counted mention: no answer, wrong whether the object is there or not
    assert response_accuracy("Ahoy, matey! I spy a sight on the beach.", is_cat, SCENE) == 0.0
    assert response_accuracy("Ahoy, matey! I spy a sight on the beach.", is_car, SCENE) == 0.0
    assert parse_yes_no("Hmm. Well, yes.") is True and parse_yes_no("Maybe.") is None


def test_where_accuracy() -> None:
    where_car = turn("where", object="car", cell=[1, 0])
    assert response_accuracy("The car is at the middle left.", where_car, SCENE) == 1.0
    assert response_accuracy("THE CAR IS AT THE MIDDLE-LEFT.", where_car, SCENE) == 1.0
    assert response_accuracy("The car is in the top right corner.", where_car, SCENE) == 0.0
    assert response_accuracy("The car is in the left column.", where_car, SCENE) == 0.0  # vague
    assert response_accuracy("The car is somewhere.", where_car, SCENE) == 0.0
    where_rose = turn("where", object="rose", cell=[0, 1])
    assert response_accuracy("Top center, matey.", where_rose, SCENE) == 1.0
    assert response_accuracy("Look in the middle.", where_rose, SCENE) == 0.0
    assert parse_position("upper left") == frozenset({(0, 0)})
    assert parse_position("in the middle row") == frozenset({(1, 0), (1, 1), (1, 2)})
    # scattered copies have no true phrase; an absent object has no position at all
    assert response_accuracy("top left", turn("where", object="dog"), SCENE) == 0.0
    assert response_accuracy("top left", turn("where", object="cat"), SCENE) is None


def test_feel_accuracy_follows_the_characters_likes() -> None:
    # the pirate loves vehicles (a car is here) and dislikes buildings (none here): joy
    feel = turn("feel", mood="joy", favourite="vehicles", disliked="buildings")
    assert response_accuracy("I spy a car. I love this place!", feel, SCENE) == 1.0
    assert response_accuracy("I do not like this place.", feel, SCENE) == 0.0
    mixed = turn("feel", mood="mixed", favourite="vehicles", disliked="plants")
    assert response_accuracy("I love the car, but I do not like the rose.", mixed, SCENE) == 1.0
    assert parse_mood("It is an ordinary place.") == "neutral" and parse_mood("Hi.") is None
    assert response_accuracy("I spy a car.", turn("describe"), SCENE) is None


def test_capitals_replies_parse_like_plain_text() -> None:
    reply = "BOOT SEQUENCE COMPLETE! YES! MY SENSORS DETECT TWO DOGS AT THE TOP LEFT."
    assert parse_yes_no(reply) is True and parse_count(reply, "dog") == 2
    assert parse_position(reply) == frozenset({(0, 0)})
    assert relevance_scores(reply, SCENE).precision == 1.0
    assert persona_consistency(reply, ROBOT, CHARACTERS) == 1.0
    assert persona_consistency(reply.capitalize(), ROBOT, CHARACTERS) == pytest.approx(2 / 3)


def test_describe_relevance_precision_and_recall() -> None:
    describe = turn("describe")
    assert image_text_relevance("I spy two dogs, a car and a rose.", SCENE, turn=describe) == 1.0
    extra = relevance_scores("I spy two dogs, a car, a rose and a cat.", SCENE)
    assert extra.precision == 0.75 and extra.recall == 1.0
    assert extra.f1 == pytest.approx(2 * 0.75 / 1.75)
    missing = relevance_scores("I spy two dogs and a car.", SCENE)
    assert missing.precision == 1.0 and missing.recall == pytest.approx(2 / 3)
    assert relevance_scores("Nothing.", SCENE).f1 == 0.0
    assert image_text_relevance("two dogs", SCENE, turn=turn("count", object="dog")) is None


def test_persona_consistency_checks() -> None:
    perfect = "Ahoy there, matey! I spy with me good eye two dogs. Fair winds and following seas!"
    assert persona_consistency(perfect, PIRATE, CHARACTERS) == 1.0
    borrowed = perfect.replace("I spy with me good eye", "My sensors detect")
    assert foreign_markers(borrowed, PIRATE, CHARACTERS) == ["my sensors detect"]
    assert persona_consistency(borrowed, PIRATE, CHARACTERS) == pytest.approx(2 / 3)
    no_title = perfect.replace(", matey", "")
    assert persona_consistency(no_title, PIRATE, CHARACTERS) == pytest.approx(2 / 3)
    assert persona_consistency("There are two dogs.", PIRATE, CHARACTERS) == pytest.approx(1 / 3)
    assert persona_consistency(borrowed.replace("Ahoy there, matey!", "").replace(
        "Fair winds and following seas!", "End of transmission!"), PIRATE, CHARACTERS) == 0.0


def test_each_quirk_kind_is_checked() -> None:
    tagged = "Hello there, sweet pea, bless your heart! I can see a dog, bless your heart."
    assert quirk_holds(tagged, GRANNY)
    assert not quirk_holds("Hello there, sweet pea, bless your heart! I can see a dog.", GRANNY)
    assert quirk_holds("Curiouser and curiouser. Elementary: I observe a dog.", DETECTIVE)
    assert not quirk_holds("Elementary: I observe a dog. Curiouser and curiouser.", DETECTIVE)
    assert quirk_holds("lo, my verses find a dog.", POET)
    assert not quirk_holds("Lo, my verses find a dog.", POET)
    assert quirk_holds("ALL CAPITALS, 123!", ROBOT)
    assert not quirk_holds("123", ROBOT)


def test_knowledge_consistency() -> None:
    who = turn("who")
    good = "Ahoy there! I am Captain Saltbeard, a pirate captain from the port of Barnacle Bay."
    assert knowledge_consistency(good, PIRATE, CHARACTERS, turn=who) == 1.0
    with_other = good + " Or am I Granny Marigold?"
    assert knowledge_consistency(with_other, PIRATE, CHARACTERS) == pytest.approx(2 / 3)
    impostor = "I am Granny Marigold, a pirate captain."
    assert knowledge_consistency(impostor, PIRATE, CHARACTERS) == pytest.approx(1 / 3)
    assert knowledge_consistency(good, PIRATE, CHARACTERS, turn=turn("feel")) is None


def test_instruction_adherence_checks_the_form_of_the_answer() -> None:
    assert instruction_adherence("Two of them.", turn("count", object="dog")) == 1.0
    assert instruction_adherence("Yes!", turn("count", object="dog")) == 0.0
    assert instruction_adherence("Yes!", turn("exists", object="cat")) == 1.0
    assert instruction_adherence("Two dogs.", turn("exists", object="dog")) == 0.0
    assert instruction_adherence("At the bottom right.", turn("where", object="car")) == 1.0
    assert instruction_adherence("It is there.", turn("where", object="car")) == 0.0
    assert instruction_adherence("A rose!", turn("describe")) == 1.0
    assert instruction_adherence("Nice.", turn("describe")) == 0.0
    assert instruction_adherence("What a wonderful place.", turn("feel")) == 1.0
    assert instruction_adherence("My name is Bob.", {"type": "who"}) == 1.0
    assert instruction_adherence("I spy two dogs.", {"type": "who"}) == 0.0


def test_score_reply_and_aggregate() -> None:
    reply = "Ahoy there, matey! I spy with me good eye three dogs. Fair winds and following seas!"
    scores = score_reply(reply, turn("count", object="dog", count=2), SCENE, PIRATE, CHARACTERS)
    assert set(scores) == set(METRICS)
    assert scores["response_accuracy"] == 0.0 and scores["instruction_adherence"] == 1.0
    assert scores["persona_consistency"] == 1.0
    assert scores["image_text_relevance"] is None and scores["knowledge_consistency"] is None
    rows = [{"type": "count", "character_split": "train", **scores},
            {"type": "count", "character_split": "heldout", "response_accuracy": 1.0,
             "persona_consistency": 0.5},
            {"type": "who", "character_split": "heldout", "knowledge_consistency": 1.0}]
    summary = aggregate(rows)
    assert summary["overall"]["n"] == 3 and summary["overall"]["response_accuracy"] == 0.5
    assert summary["overall"]["persona_consistency"] == 0.75
    assert summary["by_type"]["who"]["response_accuracy"] is None
    assert summary["by_character_split"]["heldout"]["n"] == 2
    assert summary["by_character_split"]["train"]["response_accuracy"] == 0.0
    assert set(summary["by_type"]) == {"count", "who"}


@pytest.mark.parametrize("qtype, target, reply, accuracy, adherence", [
    # replies of the kind the quick demo gives (issue 20), scored by hand against SCENE
    ("count", {"object": "dog"}, "I SPY A SIGHT IN THE OLD MILL BRIDGE!", 0.0, 0.0),  # no number at all
    ("count", {"object": "dog"}, "ARR, I SPY THREE DOGS ON THE BEACH!", 0.0, 1.0),  # a number, the wrong one
    ("count", {"object": "dog"}, "arr, two dogs, matey.", 1.0, 1.0),
    ("count", {"object": "cat"}, "I spy two roller skates.", 0.0, 1.0),  # a number, but not the cat's (0)
    ("exists", {"object": "cat"}, "I SPY A ROLLER SKATE ON THE BEACH.", 0.0, 0.0),  # neither yes/no nor a cat
    ("exists", {"object": "car"}, "Yes, a roller skate!", 1.0, 1.0),  # the yes word answers, right
    ("exists", {"object": "cat"}, "Yes! I spy a cat.", 0.0, 1.0),
    ("where", {"object": "car"}, "THE CAR IS AT THE MIDDLE LEFT.", 1.0, 1.0),
    ("where", {"object": "rose"}, "The rose is at the top centre.", 1.0, 1.0),
    ("where", {"object": "rose"}, "The rose is at the bottom right.", 0.0, 1.0),
    ("where", {"object": "dog"}, "The dogs are in the top left corner.", 0.0, 1.0),  # scattered copies: no tight region
])
def test_hand_checked_model_replies(qtype, target, reply, accuracy, adherence) -> None:
    asked = turn(qtype, **target)
    assert response_accuracy(reply, asked, SCENE) == accuracy
    assert instruction_adherence(reply, asked) == adherence


def test_hand_checked_describe_replies() -> None:
    guessed = relevance_scores("I SPY A ROLLER SKATE, A GAME CONTROLLER AND A ROLLER COASTER!", SCENE)
    assert (guessed.precision, guessed.recall, guessed.f1) == (0.0, 0.0, 0.0)
    half = relevance_scores("Two dogs and a roller skate on the beach.", SCENE)  # 1 of 2 named present, 1 of 3
    assert half.precision == 0.5 and half.recall == pytest.approx(1 / 3) and half.f1 == pytest.approx(0.4)
