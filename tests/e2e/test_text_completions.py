"""/v1/completions, /tokenize, /detokenize, token logprobs in chat, and the run's generation_config.json
filling the sampling fields a request leaves out: TestClient, httpx streaming and the official openai client."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import openai  # a dev dependency
import pytest
from fastapi.testclient import TestClient

from personae.models.generation import SamplingParams, generate
from personae.models.generation_config import GenerationDefaults, read_generation_config, write_generation_config
from personae.serve.app import RunBundle
from tests.e2e.helpers import chat_body, sse_events, streamed_texts

PROMPT = "Once upon a time, the captain said"


def test_text_completion_is_what_generate_writes(client: TestClient, bundle: RunBundle, finetuned_run: Path) -> None:
    answer = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "temperature": 0.8,
                                                   "seed": 4, "min_p": 0.05, "presence_penalty": 0.5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    ids = bundle.tokenizer.encode(PROMPT)
    defaults = read_generation_config(finetuned_run)
    expected = generate(bundle.model, bundle.tokenizer, [ids], None,
                        SamplingParams(max_new_tokens=10, temperature=0.8, seed=4, min_p=0.05, presence_penalty=0.5,
                                       max_repeats=defaults.max_repeats))[0]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected.text
    assert body["choices"][0]["finish_reason"] == expected.finish_reason and body["choices"][0]["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(expected.token_ids),
                             "total_tokens": len(ids) + len(expected.token_ids)}
    by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 10, "temperature": 0.8, "seed": 4,
                                                  "min_p": 0.05, "presence_penalty": 0.5}).json()
    assert by_ids["choices"][0]["text"] == expected.text  # token ids are the same prompt
    echoed = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 10, "echo": True, "temperature": 0.8,
                                                  "seed": 4, "min_p": 0.05, "presence_penalty": 0.5}).json()
    assert echoed["choices"][0]["text"] == bundle.tokenizer.decode(ids) + expected.text


def test_left_out_fields_take_the_run_generation_config(make_app, run_copy: Path, bundle: RunBundle) -> None:
    """Greedy with loop breaking from the run's file, never temperature 1 without it (word salad)."""
    write_generation_config(run_copy, GenerationDefaults(temperature=0.0, max_repeats=1))
    client = TestClient(make_app(run=run_copy))
    ids = bundle.tokenizer.encode(PROMPT)
    expected = generate(bundle.model, bundle.tokenizer, [ids], None,
                        SamplingParams(max_new_tokens=12, temperature=0.0, max_repeats=1))[0]
    for body in ({"prompt": PROMPT, "max_tokens": 12}, {"prompt": PROMPT, "max_tokens": 12, "temperature": None,
                                                        "top_p": None, "n": None, "stream": None}):
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == expected.text
    chat = [client.post("/v1/chat/completions", json=chat_body(max_tokens=10, seed=seed)).json() for seed in (1, 2)]
    assert chat[0]["choices"][0]["message"] == chat[1]["choices"][0]["message"]  # greedy: the seed does not matter


def test_completion_logprobs_in_the_legacy_shape(client: TestClient, bundle: RunBundle) -> None:
    body = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "logprobs": 3,
                                                "temperature": 0, "ignore_eos": True}).json()
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 6
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"][1] == len(logprobs["tokens"][0])
    for token, value, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert len(top) <= 3 and value <= 0
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the chosen token is the best one
        assert token in top


def test_chat_logprobs_in_openai_shape_streamed_too(client: TestClient) -> None:
    body = chat_body(max_tokens=6, logprobs=True, top_logprobs=2, temperature=0.7, seed=9, ignore_eos=True)
    answer = client.post("/v1/chat/completions", json=body).json()
    content = answer["choices"][0]["logprobs"]["content"]
    assert len(content) == 6 and "".join(c["token"] for c in content) == answer["choices"][0]["message"]["content"]
    for item in content:
        assert bytes(item["bytes"]) == item["token"].encode() and len(item["top_logprobs"]) == 2
        assert item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][1]["logprob"]
        assert item["logprob"] <= item["top_logprobs"][0]["logprob"] + 1e-6
    events = sse_events(client.post("/v1/chat/completions", json=body | {"stream": True}).text)
    streamed = [c for e in events if isinstance(e, dict) for ch in e["choices"] if ch.get("logprobs")
                for c in ch["logprobs"]["content"]]
    assert streamed_texts(events)[0] == answer["choices"][0]["message"]["content"]
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    assert [c["logprob"] for c in streamed] == pytest.approx([c["logprob"] for c in content], abs=1e-4)
    plain = client.post("/v1/chat/completions", json=chat_body()).json()
    assert plain["choices"][0]["logprobs"] is None


def test_tokenize_and_detokenize_round_trip(client: TestClient, bundle: RunBundle) -> None:
    tokens = client.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["tokens"] == bundle.tokenizer.encode(PROMPT) and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == bundle.model.max_positions
    bare = client.post("/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()
    assert bare["tokens"] == tokens["tokens"][1:]
    assert client.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": PROMPT}
    bad = client.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("change, code, param", [
    ({"suffix": "end"}, "unsupported", "suffix"),
    ({"prompt": ["one", "two"]}, "invalid_value", "prompt"),
    ({"prompt": [10**9]}, "invalid_value", "prompt"),
    ({"max_tokens": 100000}, "max_tokens_too_large", "max_tokens"),
    ({"mirostat": 2}, "unsupported_sampler", "mirostat"),
    ({"tfs": 0.9}, "unsupported_sampler", "tfs"),
    ({"use_beam_search": True}, "unsupported_sampler", "use_beam_search"),
    ({"logit_bias": {"x": 1}}, "invalid_value", "logit_bias"),
    ({"dry_sequence_breakers": "not json"}, "invalid_value", "dry_sequence_breakers"),
])
def test_bad_text_completions_name_the_field(client: TestClient, change: dict, code: str, param: str) -> None:
    answer = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4} | change)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == code and answer.json()["error"]["param"] == param


def test_sillytavern_text_completion_samplers_are_accepted(client: TestClient) -> None:
    """What SillyTavern's Text Completion mode sends to a llama.cpp backend, neutral samplers included."""
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
            "typical_p": 1, "repetition_penalty": 1.1, "frequency_penalty": 0, "presence_penalty": 0,
            "dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2,
            "dry_sequence_breakers": json.dumps(["\n", ":", "\"", "*"]), "dry_penalty_last_n": -1,
            "xtc_threshold": 0.1, "xtc_probability": 0.5, "mirostat": 0, "tfs": 1, "top_a": 0, "seed": -1,
            "stream": False, "stop": ["\nUser:"], "n": 1}
    answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_httpx_streams_a_text_completion(live_url: str) -> None:
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0.9, "seed": 5, "stream": True, "logprobs": 1,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{live_url}/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.read().decode())
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] >= 1
    text = "".join(ch["text"] for e in events[:-1] for ch in e["choices"])
    whole = httpx.post(f"{live_url}/v1/completions", json=body | {"stream": False}, timeout=30).json()
    assert text == whole["choices"][0]["text"]
    tokens = [t for e in events[:-1] for ch in e["choices"] if ch["logprobs"] for t in ch["logprobs"]["tokens"]]
    assert tokens == whole["choices"][0]["logprobs"]["tokens"]


def test_openai_client_text_completions_with_logprobs(live_url: str) -> None:
    client = openai.OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0, timeout=30)
    answer = client.completions.create(model="personae", prompt=PROMPT, max_tokens=6, logprobs=2, temperature=0,
                                       extra_body={"ignore_eos": True})
    choice = answer.choices[0]
    assert answer.object == "text_completion" and len(choice.logprobs.tokens) == 6
    assert all(math.isfinite(v) and v <= 0 for v in choice.logprobs.token_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    pieces = [c.choices[0].text for c in client.completions.create(model="personae", prompt=PROMPT, max_tokens=6,
                                                                   temperature=0, stream=True,
                                                                   extra_body={"ignore_eos": True}) if c.choices]
    assert "".join(pieces) == choice.text
    chat = client.chat.completions.create(model="personae/chef-baptiste", max_tokens=5, logprobs=True, top_logprobs=2,
                                          messages=[{"role": "user", "content": "Hello!"}])
    assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 2
