"""A Hugging Face LM's own tokenizer and chat template, with the small interface generation uses.

:class:`HFChatTokenizer` wraps ``AutoTokenizer`` loaded from a local folder (never downloaded)
and offers what the generation engine and prompting read of personae's
:class:`~personae.data.tokenizer.Tokenizer`: ``encode``, ``decode``, ``eos_id``, ``pad_id``,
``vocab_size``. Prompts come from the LM's own chat template (``apply_chat_template``): the card
becomes the system message, the conversation the user / assistant turns.

Training labels cover the assistant spans only. A span is found by rendering the conversation up
to an assistant message with ``add_generation_prompt=True`` (where the reply starts) and up to
and including it (where the reply's turn ends); the reply's text and the template's end-of-turn
token carry the loss, the whitespace the template puts after the turn does not. Each piece is
tokenized on its own, so the prompt of a reply is tokenized exactly as at generation time.
``eos_id`` is the template's end-of-turn token (e.g. ``<|eot_id|>``, ``<|im_end|>``), the token
a reply ends with.

A run keeps its chat tokenizer in one file, ``chat_tokenizer.json`` (:meth:`HFChatTokenizer.save`:
the files ``save_pretrained`` writes, chat template included, as one JSON object), so the run folder
alone gives chat, evaluation and the server the tokenizer it was trained with; ``text_tokenizer``
is the run's caption tokenizer (its text tower's), which the run keeps in ``tokenizer.json``.

:class:`ChatTemplateBuilder` has :class:`~personae.data.prompt.PromptBuilder`'s ``build`` and
returns the same :class:`~personae.data.prompt.Prompt`; :func:`prompt_builder` picks the one that
fits a tokenizer. The card's example dialogues go into the system message; when a prompt is over
budget the oldest turns go first, and when the card and the latest message alone are over it the
prompt is refused (``PromptTooLong``). Lorebooks and the description cut apply to personae's own
template only.
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from personae.data.cards import CharacterCard
from personae.data.labels import IGNORE_INDEX
from personae.data.prompt import Prompt, PromptBuilder, PromptTooLong, Turn, definition_text
from personae.data.tokenizer import Tokenizer
from personae.errors import DataError
from personae.files import write_text_atomic

__all__ = ["ChatTemplateBuilder", "HFChatTokenizer", "card_messages", "prompt_builder"]

Message = dict[str, str]


def card_messages(card: CharacterCard, turns: Sequence[Turn], user: str = "User",
                  include_examples: bool = False) -> list[Message]:
    """Chat messages of a card and conversation: the card (and its examples) as the system message, then the turns."""
    system, definition = definition_text(card, user)
    text = f"{system}\n\n{definition}"
    if include_examples:
        name = card.nickname or card.name
        for dialogue in card.example_dialogues(user):
            lines = [f"{name if who == 'char' else user}: {said}" for who, said in dialogue]
            text += "\n\nExample dialogue:\n" + "\n".join(lines)
    messages = [{"role": "system", "content": text}]
    for turn in turns:
        messages.append({"role": "user", "content": turn.user})
        if turn.reply is not None:
            messages.append({"role": "assistant", "content": turn.reply})
    return messages


class HFChatTokenizer:
    """A local Hugging Face tokenizer with a chat template; see the module docstring."""

    def __init__(self, folder: str | Path, text_tokenizer: Tokenizer | None = None) -> None:
        if not str(folder):
            raise DataError("no tokenizer folder given: model.decoder.path is empty (a Hugging Face decoder "
                            "needs its local model folder, with the tokenizer beside the weights)")
        self.folder = Path(folder)
        self.text_tokenizer = text_tokenizer  # the run's caption tokenizer, saved beside this one
        if not (self.folder / "tokenizer_config.json").is_file():
            raise DataError("no tokenizer_config.json in the Hugging Face model folder: the decoder's "
                            "tokenizer (with its chat template) must be saved beside the model", self.folder)
        from transformers import AutoTokenizer  # here, not at the top: transformers is the extra personae[hf]

        self.hf = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        if not getattr(self.hf, "chat_template", None):
            raise DataError("the tokenizer has no chat template (chat_template in tokenizer_config.json or "
                            "chat_template.jinja): prompts are rendered with the LM's own template", self.folder)
        self.eos_id = self._end_of_turn()
        pad = self.hf.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_id)  # padding is masked: any id will do

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer's files (chat template included) as one JSON file at `path`."""
        files: dict[str, dict[str, str]] = {}
        with tempfile.TemporaryDirectory() as staging:
            self.hf.save_pretrained(staging)
            for file in sorted(Path(staging).iterdir()):
                data = file.read_bytes()
                try:
                    files[file.name] = {"text": data.decode("utf-8")}
                except UnicodeDecodeError:  # a sentencepiece model
                    files[file.name] = {"base64": base64.b64encode(data).decode("ascii")}
        return write_text_atomic(Path(path), json.dumps({"format": 1, "source": str(self.folder), "files": files}))

    @classmethod
    def load(cls, path: str | Path, text_tokenizer: Tokenizer | None = None) -> HFChatTokenizer:
        """The tokenizer :meth:`save` wrote to `path` (errors name that file)."""
        path = Path(path)
        try:
            files = json.loads(path.read_text(encoding="utf-8"))["files"]
            entries = {name: _file_bytes(entry) for name, entry in files.items() if _plain_name(name)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise DataError(f"not a saved chat tokenizer ({error})", path) from None
        with tempfile.TemporaryDirectory() as staging:
            for name, data in entries.items():
                (Path(staging) / name).write_bytes(data)
            tokenizer = cls(staging, text_tokenizer)
        tokenizer.folder = path
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, *, max_length: int | None = None, add_cls: bool = False, add_eos: bool = False,
               parse_special: bool = True) -> list[int]:
        """Token ids of `text`, with :meth:`Tokenizer.encode`'s keywords (the server passes them).

        Special strings in `text` (the template's markers) are tokens unless parse_special is off;
        add_cls puts the LM's bos token first (when it has one), add_eos the end-of-turn token last;
        max_length cuts the body so the whole fits.
        """
        ids = list(self.hf.encode(text, add_special_tokens=False, split_special_tokens=not parse_special))
        head = [int(self.hf.bos_token_id)] if add_cls and self.hf.bos_token_id is not None else []
        tail = [self.eos_id] if add_eos else []
        if max_length is not None:
            ids = ids[: max(0, max_length - len(head) - len(tail))]
        return head + ids + tail

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the tokenizer's special tokens (the template's markers, bos, eos, pad)."""
        return frozenset(int(i) for i in self.hf.all_special_ids)

    def id_to_token(self, index: int) -> str | None:
        """The token string of an id (None outside the vocabulary)."""
        return self.hf.convert_ids_to_tokens(int(index)) if 0 <= int(index) < len(self.hf) else None

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of `ids`, without special tokens unless asked."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The chat template's text of `messages`."""
        return self.hf.apply_chat_template(list(messages), tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a prompt that ends where the assistant's reply starts."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def example(self, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
        """(ids, labels) of a conversation: labels are the ids on assistant spans, else IGNORE_INDEX."""
        ids: list[int] = []
        labels: list[int] = []
        done = 0  # characters of the full text tokenized so far
        full = self.render(messages)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            if not full.startswith(before):
                raise DataError("the chat template renders a conversation's start differently once it goes "
                                "on: assistant spans cannot be found", self.folder)
            start, end = len(before), len(self.render(messages[: i + 1]))
            end = start + len(full[start:end].rstrip())  # the template's trailing whitespace is not the reply's
            prompt, reply = self.encode(full[done:start]), self.encode(full[start:end])
            ids += prompt + reply
            labels += [IGNORE_INDEX] * len(prompt) + reply
            done = end
        tail = self.encode(full[done:])
        return ids + tail, labels + [IGNORE_INDEX] * len(tail)

    def _end_of_turn(self) -> int:
        """The first token the template puts after an assistant reply (its end-of-turn), else eos."""
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
        start = len(self.render(messages[:1], add_generation_prompt=True))
        after = self.render(messages)[start + 1 :].lstrip(" ")
        ids = self.encode(after)
        if ids and ids[0] in self.hf.all_special_ids:
            return int(ids[0])
        if self.hf.eos_token_id is None:
            raise DataError("the tokenizer has neither an end-of-turn special token after an assistant reply "
                            "nor an eos_token", self.folder)
        return int(self.hf.eos_token_id)


def _plain_name(name: object) -> bool:
    """A file name with no folder part (a saved tokenizer never writes outside its folder)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"bad file name {name!r}")
    return True


def _file_bytes(entry: dict[str, str]) -> bytes:
    """The bytes of one saved file: {"text": ...} or {"base64": ...}."""
    return entry["text"].encode("utf-8") if "text" in entry else base64.b64decode(entry["base64"], validate=True)


class ChatTemplateBuilder:
    """Prompts from an LM's chat template with PromptBuilder's interface; see the module docstring."""

    def __init__(self, tokenizer: HFChatTokenizer) -> None:
        self.tok = tokenizer

    def build(self, card: CharacterCard, turns: list[Turn], *, max_tokens: int, user: str = "User",
              include_examples: bool = True) -> Prompt:
        """Assemble `turns` (the last one's reply None when generating) into at most max_tokens ids."""
        if not turns:
            raise ValueError("a prompt needs at least one turn")
        if any(t.reply is None for t in turns[:-1]):
            raise ValueError("only the last turn may lack a reply")
        for dropped in range(len(turns)):
            messages = card_messages(card, turns[dropped:], user, include_examples)
            if turns[-1].reply is None:
                ids = self.tok.prompt_ids(messages)
                labels = [IGNORE_INDEX] * len(ids)
            else:
                ids, labels = self.tok.example(messages)
            if len(ids) <= max_tokens:
                return Prompt(ids, labels, dropped_turns=dropped,
                              segments={"definition": self._head_length(messages[0], ids), "examples": 0})
        raise PromptTooLong(f"the card and the latest message take {len(ids)} tokens of the chat template; "
                            f"the budget is {max_tokens}")

    def _head_length(self, system: Message, ids: list[int]) -> int:
        """Tokens at the start of `ids` that every prompt of the card shares (the server caches them once).

        The ids of the system message rendered alone, as far as they agree with the prompt's: a token
        that merges across the message's end is left out, so the head never differs between prompts.
        """
        alone = self.tok.encode(self.tok.render([system]))
        shared = 0
        for mine, theirs in zip(alone, ids):
            if mine != theirs:
                break
            shared += 1
        return shared


def prompt_builder(tokenizer: Tokenizer | HFChatTokenizer) -> PromptBuilder | ChatTemplateBuilder:
    """The prompt builder of a tokenizer: the LM's chat template for a Hugging Face one, else personae's."""
    return ChatTemplateBuilder(tokenizer) if isinstance(tokenizer, HFChatTokenizer) else PromptBuilder(tokenizer)
