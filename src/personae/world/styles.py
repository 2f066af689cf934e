"""The reply voice: true answer sentences about a scene, framed by a character's markers and quirk.

A reply is built in two layers. The *content* is one of the shared answer templates below, filled
from the scene graph (so it is true), and the only character-specific word in it is the seeing
phrase. The *voice* then adds a greeting and/or sign-off and applies the quirk (title, sentence
tag, prefix, capitals or lower case). The answer vocabulary (yes/no words, mood cues, self-intro
cues) is defined here once and reused by ``personae.world.metrics`` to parse replies back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from personae.world.captions import join_words, position_phrases_for
from personae.world.catalog import OBJECTS
from personae.world.characters import Character
from personae.world.scene import Placed, Scene
from personae.world.settings import SETTINGS

Sentence = tuple[str, str]  # (text without its end mark, end mark)
Template = tuple[Sentence, ...]

# -- the answer vocabulary (shared with the metrics) --------------------------------------------

YES_WORDS = ("yes", "yeah", "yep")
NO_WORDS = ("no", "nope")
POSITIVE_CUES = ("love", "lovely", "adore", "wonderful", "delightful", "favourite", "favorite")
NEGATIVE_CUES = ("do not like", "don't like", "dislike", "hate", "not fond")
NEUTRAL_CUES = ("either way", "ordinary", "indifferent", "nothing special")
SELF_INTRO_CUES = ("i am", "i'm", "my name is", "call me")
MOODS = ("joy", "dislike", "mixed", "neutral")

# -- the answer templates (slots are filled from the scene graph) --------------------------------

DESCRIBE_TEMPLATES: tuple[Template, ...] = (
    (("{seeing} {objects} {place}", "."),),
    (("{seeing} {objects}", "."), ("What a sight {place}", "!")),
)
COUNT_TEMPLATES: tuple[Template, ...] = (
    (("{seeing} {counted}", "."),),
    (("{seeing} {counted} {place}", "."),),
    (("That makes {counted} in all", "."),),
)
COUNT_ZERO_TEMPLATES: tuple[Template, ...] = (
    (("There are no {plural} here", "."),),
    (("Not a single one: there are no {plural} {place}", "."),),
)
EXISTS_YES_TEMPLATES: tuple[Template, ...] = (
    (("Yes", "!"), ("{seeing} {counted}", ".")),
    (("Yes, there {be} {counted} {place}", "."),),
)
EXISTS_NO_TEMPLATES: tuple[Template, ...] = (
    (("No", "."), ("There is no {name} {place}", ".")),
    (("Nope, not a single {name} here", "."),),
)
WHERE_TEMPLATES: tuple[Template, ...] = (
    (("{seeing} the {name} {position}", "."),),
    (("The {name} is {position}", "."),),
    (("Look {position}: that is where the {name} is", "."),),
)
FEEL_TEMPLATES: dict[str, tuple[Template, ...]] = {
    "joy": ((("{seeing} {liked}", "!"), ("I love this place", "!")),
            (("{seeing} {liked}, my favourite", "!"), ("What a wonderful place", "."))),
    "dislike": ((("{seeing} {disliked}", "."), ("I do not like this place at all", ".")),
                (("Ugh, {disliked} {place}", "."), ("I dislike it here", "."))),
    "mixed": ((("{seeing} {liked}, which I love", "."), ("But I do not like {disliked}", ".")),),
    "neutral": ((("Nothing here stirs me either way", "."), ("It is an ordinary place", ".")),
                (("It is an ordinary spot {place}", "."), ("I could take it or leave it", "."))),
}
WHO_TEMPLATES: tuple[Template, ...] = (
    (("I am {name}, {role} from {home}", "."),),
    (("My name is {name}", "."), ("I am {role} from {home}", ".")),
)
CARD_INTRO: Template = (("I am {name}, {role} from {home}", "."),
                        ("Show me a picture and ask me about it", "."))


def all_templates() -> list[Template]:
    """Every answer template (for vocabulary checks)."""
    groups = [DESCRIBE_TEMPLATES, COUNT_TEMPLATES, COUNT_ZERO_TEMPLATES, EXISTS_YES_TEMPLATES,
              EXISTS_NO_TEMPLATES, WHERE_TEMPLATES, WHO_TEMPLATES, (CARD_INTRO,),
              *FEEL_TEMPLATES.values()]
    return [template for group in groups for template in group]


# -- the voice ------------------------------------------------------------------------------------


def render_reply(character: Character, sentences: Sequence[Sentence]) -> str:
    """Join sentences into one reply and apply the character's quirk."""
    if not sentences:
        raise ValueError("a reply needs at least one sentence")
    quirk = character.style.quirk
    texts = [text for text, _ in sentences]
    if quirk.kind == "title":
        texts[0] = f"{texts[0]}, {quirk.text}"
    elif quirk.kind == "tag":
        texts = [f"{text}, {quirk.text}" for text in texts]
    reply = " ".join(text[:1].upper() + text[1:] + end
                     for text, (_, end) in zip(texts, sentences))
    if quirk.kind == "prefix":
        reply = f"{quirk.text} {reply}"
    elif quirk.kind == "capitals":
        reply = reply.upper()
    elif quirk.kind == "lowercase":
        reply = reply.lower()
    return reply


def compose_reply(character: Character, content: Sequence[Sentence], *,
                  greeting: str | None = None, sign_off: bool = False) -> str:
    """The content framed by an optional greeting and sign-off, in the character's voice."""
    sentences = [(greeting, "!")] if greeting else []
    sentences += list(content)
    if sign_off:
        sentences.append((character.style.sign_off, "!"))
    return render_reply(character, sentences)


def fill(template: Template, **slots: str) -> list[Sentence]:
    """The template's sentences with every {slot} filled."""
    return [(text.format(**slots), end) for text, end in template]


def _pick(options: Sequence, rng: np.random.Generator):  # noqa: ANN202 - any element type
    return options[int(rng.integers(len(options)))]


def _place(scene: Scene, rng: np.random.Generator) -> str:
    return _pick(SETTINGS[scene.setting].places, rng)


def _objects(placed: Sequence[Placed], rng: np.random.Generator) -> str:
    """'a dog, two red apples and a kite', in random order."""
    order = rng.permutation(len(placed))
    return join_words([OBJECTS[placed[i].name].counted(placed[i].count) for i in order])


# -- content for each question type ---------------------------------------------------------------


def describe_content(character: Character, scene: Scene,
                     rng: np.random.Generator) -> list[Sentence]:
    """Every object of the scene with its count, and where the scene is."""
    return fill(_pick(DESCRIBE_TEMPLATES, rng), seeing=character.style.seeing,
                objects=_objects(scene.objects, rng), place=_place(scene, rng))


def count_content(character: Character, scene: Scene, name: str,
                  rng: np.random.Generator) -> list[Sentence]:
    """How many copies of ``name`` the scene has (maybe none)."""
    placed, obj = scene.get(name), OBJECTS[name]
    if placed is None:
        return fill(_pick(COUNT_ZERO_TEMPLATES, rng), plural=obj.plural, place=_place(scene, rng))
    return fill(_pick(COUNT_TEMPLATES, rng), seeing=character.style.seeing,
                counted=obj.counted(placed.count, one="one"), place=_place(scene, rng))


def exists_content(character: Character, scene: Scene, name: str,
                   rng: np.random.Generator) -> list[Sentence]:
    """Yes (with the count) or no."""
    placed, obj = scene.get(name), OBJECTS[name]
    if placed is None:
        return fill(_pick(EXISTS_NO_TEMPLATES, rng), name=obj.name, place=_place(scene, rng))
    return fill(_pick(EXISTS_YES_TEMPLATES, rng), seeing=character.style.seeing,
                counted=obj.counted(placed.count), be="is" if placed.count == 1 else "are",
                place=_place(scene, rng))


def where_content(character: Character, scene: Scene, name: str,
                  rng: np.random.Generator) -> list[Sentence]:
    """The cell of an object present once, as a position phrase."""
    placed = scene.get(name)
    if placed is None or placed.count != 1:
        raise ValueError(f"where: {name!r} must be present exactly once in {scene.scene_id}")
    return fill(_pick(WHERE_TEMPLATES, rng), seeing=character.style.seeing, name=name,
                position=_pick(position_phrases_for(placed), rng))


def expected_mood(scene: Scene, favourite: str, disliked: str) -> str:
    """joy / dislike / mixed / neutral: which of the two categories the scene holds."""
    has_favourite = any(p.category == favourite for p in scene.objects)
    has_disliked = any(p.category == disliked for p in scene.objects)
    if has_favourite and has_disliked:
        return "mixed"
    return "joy" if has_favourite else "dislike" if has_disliked else "neutral"


def feel_content(character: Character, scene: Scene,
                 rng: np.random.Generator) -> list[Sentence]:
    """Joy at the favourite category, displeasure at the disliked one, else indifference."""
    style = character.style
    mood = expected_mood(scene, style.favourite, style.disliked)
    liked = [p for p in scene.objects if p.category == style.favourite]
    disliked = [p for p in scene.objects if p.category == style.disliked]
    return fill(_pick(FEEL_TEMPLATES[mood], rng), seeing=style.seeing,
                liked=_objects(liked, rng) if liked else "",
                disliked=_objects(disliked, rng) if disliked else "", place=_place(scene, rng))


def who_content(character: Character, rng: np.random.Generator) -> list[Sentence]:
    """Name, role and home, from the card's facts."""
    return fill(_pick(WHO_TEMPLATES, rng), name=character.name, role=character.role_phrase,
                home=character.home)


# -- card text ------------------------------------------------------------------------------------

EXAMPLE_SCENE = Scene("example", "meadow", [
    Placed("dog", "animals", 1, [(1, 0)]),
    Placed("red apple", "food", 2, [(0, 2), (2, 2)]),
])


def card_greetings(character: Character) -> list[str]:
    """One opening message per greeting: greeting, who I am, an invitation."""
    intro = fill(CARD_INTRO, name=character.name, role=character.role_phrase,
                 home=character.home)
    return [compose_reply(character, intro, greeting=g) for g in character.style.greetings]


def mes_example(character: Character) -> str:
    """Two example exchanges in Tavern's <START> / {{user}}: / {{char}}: format."""
    rng = np.random.default_rng(0)
    style = character.style
    who = compose_reply(character, who_content(character, rng), greeting=style.greetings[0],
                        sign_off=True)
    count = compose_reply(character, count_content(character, EXAMPLE_SCENE, "red apple", rng),
                          greeting=style.greetings[-1], sign_off=True)
    return (f"<START>\n{{{{user}}}}: Who are you?\n{{{{char}}}}: {who}\n"
            f"<START>\n{{{{user}}}}: How many red apples do you see?\n{{{{char}}}}: {count}")


__all__ = [
    "DESCRIBE_TEMPLATES", "EXAMPLE_SCENE", "MOODS", "NEGATIVE_CUES", "NEUTRAL_CUES", "NO_WORDS",
    "POSITIVE_CUES", "SELF_INTRO_CUES", "YES_WORDS", "Sentence", "Template", "all_templates",
    "card_greetings", "compose_reply", "count_content", "describe_content", "exists_content",
    "expected_mood", "feel_content", "fill", "mes_example", "render_reply", "where_content",
    "who_content",
]
