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

:class:`ChatTemplateBuilder` has :class:`~personae.data.prompt.PromptBuilder`'s ``build`` and
returns the same :class:`~personae.data.prompt.Prompt`; :func:`prompt_builder` picks the one that
fits a tokenizer. The card's example dialogues go into the system message; when a prompt is over
budget the oldest turns go first, and when the card and the latest message alone are over it the
prompt is refused (``PromptTooLong``). Lorebooks and the description cut apply to personae's own
template only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from personae.data.cards import CharacterCard
from personae.data.labels import IGNORE_INDEX
from personae.data.prompt import Prompt, PromptBuilder, PromptTooLong, Turn, definition_text
from personae.data.tokenizer import Tokenizer
from personae.errors import DataError

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

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
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

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (special strings in it, such as the template's markers, are tokens)."""
        return list(self.hf.encode(text, add_special_tokens=False))

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
                return Prompt(ids, labels, dropped_turns=dropped)
        raise PromptTooLong(f"the card and the latest message take {len(ids)} tokens of the chat template; "
                            f"the budget is {max_tokens}")


def prompt_builder(tokenizer: Tokenizer | HFChatTokenizer) -> PromptBuilder | ChatTemplateBuilder:
    """The prompt builder of a tokenizer: the LM's chat template for a Hugging Face one, else personae's."""
    return ChatTemplateBuilder(tokenizer) if isinstance(tokenizer, HFChatTokenizer) else PromptBuilder(tokenizer)
