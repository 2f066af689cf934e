"""`personae chat` survives a per-message error and a Ctrl-C: in process, and under a real terminal (tmux)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from personae.chat.session import ChatSession, find_character, run_terminal_chat
from personae.models.generation import SamplingParams
from tests.e2e.helpers import CHARACTER


def _session(bundle, run: Path, max_tokens: int = 12) -> ChatSession:
    card = find_character(run, CHARACTER)
    return ChatSession(bundle.model, bundle.tokenizer, card, params=SamplingParams(max_new_tokens=max_tokens))


def test_an_error_in_one_message_is_reported_and_the_chat_goes_on(bundle, finetuned_run: Path) -> None:
    session = _session(bundle, finetuned_run)
    lines = iter(["word " * 3000, "Hello!", "/quit"])  # the first message alone is over the model's context
    buffer = io.StringIO()
    run_terminal_chat(session, read=lambda prompt: next(lines), out=buffer)
    text = buffer.getvalue()
    assert text.count("(error: ") == 1 and "the chat goes on" in text
    assert [turn.user for turn in session.history] == ["Hello!"]  # the failed message left no turn


class _Interrupting(io.StringIO):
    """A terminal whose user presses Ctrl-C when the first reply has printed `after` pieces."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.pieces, self.after, self.fired = 0, after, False

    def write(self, text: str) -> int:
        if self.fired is False and not text.endswith(("> ", ": ", "\n")):
            self.pieces += 1
            if self.pieces > self.after:
                self.fired = True
                raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_reply_not_the_session(bundle, finetuned_run: Path) -> None:
    session = _session(bundle, finetuned_run, max_tokens=40)
    session.params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=1)
    lines = iter(["Tell me a long story.", "And then?", "/quit"])
    out = _Interrupting(after=1)
    run_terminal_chat(session, read=lambda prompt: next(lines), out=out)
    assert out.fired and " (stopped)\n" in out.getvalue()
    assert [turn.user for turn in session.history] == ["Tell me a long story.", "And then?"]


def test_ctrl_c_at_the_prompt_drops_the_line_and_ctrl_d_leaves(bundle, finetuned_run: Path) -> None:
    session = _session(bundle, finetuned_run)
    keys = iter([KeyboardInterrupt, "Hello!", EOFError])

    def read(prompt: str) -> str:
        key = next(keys)
        if isinstance(key, type):
            raise key
        return key

    buffer = io.StringIO()
    run_terminal_chat(session, read=read, out=buffer)
    assert "(Ctrl-C stops a reply; /quit or Ctrl-D leaves)" in buffer.getvalue()
    assert [turn.user for turn in session.history] == ["Hello!"]


def _pane(name: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout


def test_under_a_real_terminal_errors_and_ctrl_c_leave_the_session_running(finetuned_run: Path) -> None:
    if shutil.which("tmux") is None:  # a missing terminal fails loudly: .ci/run installs it
        pytest.fail("the terminal test needs tmux: apt-get install tmux")
    name = f"personae-chat-{time.monotonic_ns()}"
    # the tmux server may be older than this test: the environment goes on the command line
    paths = os.pathsep.join(sys.path)
    command = ["env", f"PYTHONPATH={paths}", "OMP_NUM_THREADS=1", sys.executable, "-m", "personae.app.cli", "chat", str(finetuned_run), "--character", CHARACTER,
               "--max-tokens", "300", "--temperature", "4.0", "--seed", "3"]  # hot: the end token stays unlikely
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "200", "-y", "50", *command], check=True)
    try:
        _wait_for(name, "User>")
        _send(name, "word " * 700)  # over the model's context
        _wait_for(name, "the chat goes on")
        _wait_for(name, "User>", count=2)
        _send(name, "Tell me everything.")  # 300 tokens: Ctrl-C lands while they stream
        _wait_for_reply(name)
        subprocess.run(["tmux", "send-keys", "-t", name, "C-c"], check=True)
        _wait_for(name, "(stopped)")
        subprocess.run(["tmux", "send-keys", "-t", name, "C-c"], check=True)  # at the prompt: the chat goes on
        _wait_for(name, "/quit or Ctrl-D leaves")
        _send(name, "/card")
        _wait_for(name, "description:")  # still chatting after the error and the Ctrl-C
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def _send(name: str, text: str) -> None:
    subprocess.run(["tmux", "send-keys", "-t", name, "-l", text], check=True)
    subprocess.run(["tmux", "send-keys", "-t", name, "Enter"], check=True)


def _wait_for_reply(name: str, timeout: float = 60.0) -> None:
    """Until the reply to the last message has begun to stream."""
    deadline = time.monotonic() + timeout
    while not _pane(name).rstrip().splitlines()[-1].split("Chef Baptiste:", 1)[-1].strip():
        if time.monotonic() > deadline:
            raise AssertionError(f"no reply began:\n{_pane(name)}")
        time.sleep(0.01)


def _wait_for(name: str, text: str, count: int = 1, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while _pane(name).count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} x{count} did not appear:\n{_pane(name)}")
        time.sleep(0.1)
