"""Recorded-shape SillyTavern chat-completion requests ("Custom (OpenAI-compatible)" source, default settings).

SillyTavern's server builds these bodies for a custom OpenAI-compatible endpoint: its default
sampler values (temperature 1, top_p 1, penalties 0, max_tokens 300, streaming on), its prompt
manager's system messages (main prompt, card description, personality, scenario, "[Start a new
Chat]"), and its utility prompts for continue, impersonate and group nudges. Images are inline
``data:`` URLs on the message they were attached to, re-sent on every turn.
"""

from __future__ import annotations

from typing import Any

from tests.e2e.helpers import data_url, png_bytes

MAIN_PROMPT = ("Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}. Write 1 reply only "
               "in internet RP style, italicize actions, and avoid quotation marks.")
CONTINUE_NUDGE = "[Continue your last message without repeating its original content.]"
IMPERSONATE = ("[Write your next reply from the point of view of {{user}}, using the chat history so far as a "
               "guideline for the writing style of {{user}}. Don't write as {{char}} or system. Don't describe "
               "actions of {{char}}.]")
GROUP_NUDGE = "[Write the next reply only as Baptiste.]"

# what SillyTavern 1.12 sends besides the messages for a custom source at its default settings
DEFAULTS: dict[str, Any] = {
    "temperature": 1, "frequency_penalty": 0, "presence_penalty": 0, "top_p": 1, "top_k": 0, "max_tokens": 300,
    "stream": True, "logit_bias": {}, "stop": [], "seed": None, "n": None, "user_name": "User", "char_name":
    "Baptiste", "group_names": [], "include_reasoning": False, "reasoning_effort": "medium",
    "chat_completion_source": "custom", "custom_prompt_post_processing": "", "tools": None, "tool_choice": None,
}


def _head(model: str) -> list[dict[str, Any]]:
    """The prompt manager's system block: main prompt, the card's fields, the chat start marker."""
    return [{"role": "system", "content": MAIN_PROMPT.replace("{{char}}", "Baptiste").replace("{{user}}", "User")},
            {"role": "system", "content": "Baptiste is a chef who runs a small bistro and loves bread."},
            {"role": "system", "content": "Baptiste's personality: warm, loud, proud of his sourdough."},
            {"role": "system", "content": "[Start a new Chat]"},
            {"role": "assistant", "content": "*wipes his hands on his apron* Bonjour! Welcome to my bistro!"}]


def _image_part(color: tuple[int, int, int]) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(png_bytes(color)), "detail": "auto"}}


def corpus(model: str) -> dict[str, dict[str, Any]]:
    """Each case's request body, by name."""
    head = _head(model)
    hello = [{"role": "user", "content": "Hello! What smells so good?"}]
    chat = hello + [{"role": "assistant", "content": "*laughs* My bread, of course! Fresh from the oven."},
                    {"role": "user", "content": "Can I try a slice?"}]
    pictured = [
        {"role": "user", "content": [{"type": "text", "text": "Look at my cake!"}, _image_part((230, 200, 40))]},
        {"role": "assistant", "content": [{"type": "text", "text": "*gasps* Magnifique! Here is mine."},
                                          _image_part((120, 60, 20))]},
        {"role": "system", "content": [{"type": "text", "text": "[User sends a picture]"}, _image_part((40, 90, 200))]},
        {"role": "user", "content": [{"type": "text", "text": "Which one is better?"}, _image_part((200, 40, 40))]},
    ]
    long_chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Message {i} about bread and butter."}
                 for i in range(160)] + [{"role": "user", "content": "So, what now?"}]
    many_images = [{"role": "user", "content": [{"type": "text", "text": f"Photo {i}"}, _image_part((i * 20, 90, 90))]}
                   if i % 2 == 0 else {"role": "assistant", "content": "*nods* Lovely."} for i in range(13)]
    bodies = {
        "default": {"messages": head + hello},
        "not_streamed": {"messages": head + chat, "stream": False},
        "continue_prefill": {"messages": head + chat + [{"role": "assistant", "content": "*cuts a thick slice*"}],
                             "stream": False},
        "continue_nudge": {"messages": head + chat + [{"role": "assistant", "content": "*cuts a slice*"},
                                                      {"role": "system", "content": CONTINUE_NUDGE}]},
        "impersonate": {"messages": head + chat + [{"role": "system", "content": IMPERSONATE}]},
        "group_nudge": {"messages": head + chat + [{"role": "system", "content": GROUP_NUDGE}]},
        "inline_images": {"messages": head + pictured},
        "many_images": {"messages": head + many_images, "stream": False},
        "long_chat": {"messages": head + long_chat, "stream": False},
        "openai_nulls": {"messages": head + hello, "temperature": None, "top_p": None, "n": None, "stream": None,
                         "frequency_penalty": None, "presence_penalty": None},
        "greedy_top_p_zero": {"messages": head + hello, "top_p": 0, "stream": False},
        "tools_auto": {"messages": head + hello, "stream": False, "tool_choice": "auto",
                       "tools": [{"type": "function", "function": {"name": "roll_dice", "parameters": {}}}]},
    }
    return {name: DEFAULTS | {"model": model} | body for name, body in bodies.items()}
