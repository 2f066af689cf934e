"""A chat with one character about one image: history, streaming replies, and the terminal loop.

A character adapted with `personae adapt` has `RUN/adapters/<id>.safetensors`;
:func:`load_run_for_character` loads the run with it applied.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from personae.config import Config
from personae.data.cards import CharacterCard, default_avatar, load_card
from personae.data.hf_tokenizer import prompt_builder
from personae.data.images import ImageSource, model_pixels
from personae.data.prompt import Turn
from personae.data.tokenizer import Tokenizer
from personae.errors import PersonaeError
from personae.models.adapter_files import attach_adapter, load_verified_adapter
from personae.models.generation import SamplingParams, stream_batch
from personae.models.io import load_model
from personae.models.model import PersonaeModel

HELP = """commands:
  /image PATH   look at another image          /card    show the character card
  /reset        start the conversation over    /quit    leave (also Ctrl-D)
  /help         this list                      Ctrl-C   stop the reply being written"""


class CharacterNotFound(PersonaeError, LookupError):
    """No card of that name or path; the message lists the characters the run knows."""


def locate_character(run: Path, name_or_card: str) -> tuple[str, CharacterCard]:
    """(id, card) of a card file path, or of a character the run knows by id (file stem) or name (any case)."""
    path = Path(name_or_card)
    if path.suffix.lower() in (".json", ".png") and path.exists():
        return path.stem, load_card(path)
    folder = Path(run) / "characters"
    known = {p.stem: p for p in sorted(folder.glob("*.json")) + sorted(folder.glob("*.png"))} if folder.is_dir() else {}
    if name_or_card in known:
        return name_or_card, load_card(known[name_or_card])
    wanted = name_or_card.strip().lower()
    for character_id, card_path in known.items():
        card = load_card(card_path)
        if card.name.lower() == wanted:
            return character_id, card
    shown = ", ".join(sorted(known)[:12]) + (" ..." if len(known) > 12 else "") if known else "none"
    raise CharacterNotFound(f"no character '{name_or_card}' in {folder} and no such card file; known: {shown}")


def find_character(run: Path, name_or_card: str) -> CharacterCard:
    """A card file path, or a character the run knows by id (file stem) or by name (any case)."""
    return locate_character(run, name_or_card)[1]


def load_run_for_character(run: Path, name_or_card: str, device: str | torch.device = "cpu"
                           ) -> tuple[PersonaeModel, Config, Tokenizer, CharacterCard]:
    """Load RUN for one character: the model with RUN/adapters/<id>.safetensors applied when it exists."""
    character_id, card = locate_character(run, name_or_card)
    model, cfg, tokenizer = load_model(run, device)
    path = Path(run) / "adapters" / f"{character_id}.safetensors"
    if path.is_file():
        tensors, metadata = load_verified_adapter(path)
        attach_adapter(model, {name: value.to(device) for name, value in tensors.items()}, metadata)
    return model, cfg, tokenizer, card


class ChatSession:
    """Keeps the card, the image and the history; `respond` streams the reply and records it."""

    def __init__(self, model: PersonaeModel, tokenizer: Tokenizer, card: CharacterCard, *,
                 params: SamplingParams | None = None, user: str = "User", include_examples: bool = False) -> None:
        self.model, self.tokenizer, self.card = model.eval(), tokenizer, card
        self.params = params or SamplingParams(max_new_tokens=64, temperature=0.0)
        self.user, self.include_examples = user, include_examples
        self.builder = prompt_builder(tokenizer)
        self.history: list[Turn] = []
        self.warnings: list[str] = []  # how the last prompt cut the card to fit (Prompt.warnings)
        self.set_image_array(card.avatar if card.avatar is not None else np.asarray(default_avatar(card.name)))

    def set_image(self, path: str | Path) -> None:
        """Look at an image file from now on (the history is kept)."""
        self.set_image_array(path)

    def set_image_array(self, image: ImageSource) -> None:
        """Look at an image (an (H, W, 3) uint8 array, or a file, bytes or PIL image) from now on."""
        device = next(self.model.parameters()).device
        self.pixels = model_pixels(image, self.model.cfg.vision.image_size)[None].to(device)  # (1, 3, S, S)

    def reset(self) -> None:
        """Forget the conversation (card and image stay)."""
        self.history = []

    @torch.no_grad()
    def respond(self, message: str) -> Iterator[str]:
        """Stream the character's reply to `message` in pieces; the reply joins the history.

        A reply stopped early (the generator closed, e.g. by Ctrl-C) joins it as far as it went.
        """
        turns = self.history + [Turn(message)]
        budget = self.model.text_budget(self.params.max_new_tokens, with_image=True)
        prompt = self.builder.build(self.card, turns, max_tokens=budget, user=self.user,
                                    include_examples=self.include_examples)
        self.warnings = prompt.warnings
        reply = ""
        try:
            for pieces in stream_batch(self.model, self.tokenizer, [prompt.ids], self.pixels, self.params):
                reply += pieces[0]
                if pieces[0]:
                    yield pieces[0]
        finally:
            self.history.append(Turn(message, reply.strip()))


def run_terminal_chat(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> None:
    """The interactive loop of `personae chat`: read a line, run a command or stream a reply."""
    name = session.card.name
    greeting = session.card.greetings(session.user)
    out.write(f"Chatting with {name}. /help lists the commands.\n")
    if greeting:
        out.write(f"{name}: {greeting[0]}\n")
    while True:
        try:
            line = read(f"{session.user}> ").strip()
        except KeyboardInterrupt:  # as in Python's prompt: the line is dropped, the chat goes on
            out.write("\n(Ctrl-C stops a reply; /quit or Ctrl-D leaves)\n")
            continue
        except EOFError:
            out.write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            if _command(session, line, out):
                return
            continue
        shown = session.warnings
        if not _reply(session, line, out):
            continue
        if session.warnings and session.warnings != shown:  # say it when the cut changes, not every message
            out.write("".join(f"(note: {warning})\n" for warning in session.warnings))


def _reply(session: ChatSession, line: str, out: TextIO) -> bool:
    """Stream one reply; an error in it is reported and Ctrl-C stops it, and the chat goes on. Whether it ran."""
    out.write(f"{session.card.name}: ")
    replies = session.respond(line)
    try:
        for piece in replies:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        replies.close()  # the partial reply stays in the history
        out.write(" (stopped)\n")
        return True
    except (PersonaeError, ValueError) as error:  # a card too long for --max-tokens, a bad image: this message only
        out.write(f"\n(error: {error}; the chat goes on: /help lists the commands)\n")
        return False
    out.write("\n")
    return True


def _command(session: ChatSession, line: str, out: TextIO) -> bool:
    """Run a /command; True means quit."""
    command, _, argument = line.partition(" ")
    if command in ("/quit", "/exit"):
        return True
    if command == "/image":
        try:
            session.set_image(argument.strip())
            out.write(f"(now looking at {argument.strip()})\n")
        except PersonaeError as error:
            out.write(f"(cannot use that image: {error})\n")
    elif command == "/card":
        fields = session.card.prompt_fields(session.user)
        out.write(f"{session.card.name}\n" + "\n".join(f"  {k}: {v}" for k, v in fields.items() if v) + "\n")
    elif command == "/reset":
        session.reset()
        out.write("(conversation reset)\n")
    else:
        out.write(HELP + "\n")
    return False
