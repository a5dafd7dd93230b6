"""Interactive chat: multi-turn history, /reset, /system, /exit, streamed output, through a real pty."""

import io
import os
import pty
import select
import subprocess
import sys
import threading
import time

import pytest

from lmpipeline.evaluate import generation as gen
from lmpipeline.evaluate.chat import ChatSession, run_chat


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama):
    return gen.load_for_inference(tiny_llama, dtype="float32")


def _session(model_and_tokenizer, **kw):
    model, tok = model_and_tokenizer
    return ChatSession(model, tok, max_new_tokens=4, temperature=0, **kw)


def test_history_reset_and_system(model_and_tokenizer):
    s = _session(model_and_tokenizer)
    first = s.reply("hello")
    s.reply("and again")
    assert [m["role"] for m in s.history] == ["user", "assistant", "user", "assistant"]
    assert s.history[1]["content"] == first
    s.set_system("Be terse.")
    assert s.history == [] and s.messages() == [{"role": "system", "content": "Be terse."}]
    s.reply("hi")
    s.reset()
    assert s.history == [] and s.system == "Be terse."


def test_second_turn_sees_the_first(model_and_tokenizer):
    s = _session(model_and_tokenizer)
    s.reply("hello")
    ids_two_turns = gen.encode_prompt(s.tokenizer, s.template, s.messages() + [{"role": "user", "content": "x"}])
    fresh = _session(model_and_tokenizer)
    ids_one_turn = gen.encode_prompt(fresh.tokenizer, fresh.template, [{"role": "user", "content": "x"}])
    assert len(ids_two_turns) > len(ids_one_turn)


def test_streamed_text_is_the_answer_and_arrives_token_by_token(model_and_tokenizer):
    s = _session(model_and_tokenizer)
    s.max_new_tokens = 8
    chunks = []

    class Out(io.StringIO):
        def write(self, text):
            chunks.append(text)
            return super().write(text)

    out = Out()
    answer = s.reply("hello", stream=out)
    assert out.getvalue().strip() == answer
    assert len(chunks) > 1  # streamed as the tokens came, not written once at the end


def test_sampled_turns_are_reproducible(model_and_tokenizer):
    a = _session(model_and_tokenizer)
    b = _session(model_and_tokenizer)
    for s in (a, b):
        s.temperature, s.max_new_tokens = 1.0, 6
    assert [a.reply("hi"), a.reply("more")] == [b.reply("hi"), b.reply("more")]


def test_loop_over_a_stream(model_and_tokenizer):
    s = _session(model_and_tokenizer)
    out = io.StringIO()
    code = run_chat(s, stdin=io.StringIO("hi\nmore\n/history\n/reset\n/history\n/bogus\n/exit\n"), stdout=out)
    text = out.getvalue()
    assert code == 0
    assert "[4 message(s) in history]" in text and "[0 message(s) in history]" in text
    assert "[conversation reset]" in text and "unknown command /bogus" in text


def _read_until(fd, marker: bytes, timeout: float = 60.0) -> bytes:
    buf = b""
    end = time.monotonic() + timeout
    while marker not in buf:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {marker!r}; got {buf[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the other side closed (EIO on Linux)
                break
            if not chunk:
                break
            buf += chunk
    return buf


def _converse(fd) -> str:
    """Two turns, /history, /reset, /history, /exit through the terminal; returns the transcript."""
    transcript = _read_until(fd, b">>> ")
    for line in (b"hello there\n", b"tell me more\n", b"/history\n", b"/reset\n", b"/history\n"):
        os.write(fd, line)
        transcript += _read_until(fd, b">>> ")
    os.write(fd, b"/exit\n")
    return transcript.decode("utf-8", errors="replace").replace("\r", "")


def test_chat_through_a_pseudo_terminal(model_and_tokenizer):
    session = _session(model_and_tokenizer)
    master, slave = pty.openpty()
    tty_in = os.fdopen(slave, "r", encoding="utf-8", closefd=False)
    tty_out = os.fdopen(os.dup(slave), "w", encoding="utf-8")
    done = {}
    thread = threading.Thread(target=lambda: done.setdefault("code", run_chat(session, stdin=tty_in, stdout=tty_out)))
    thread.start()
    try:
        text = _converse(master)
        thread.join(timeout=30)
    finally:
        tty_out.close()
        os.close(slave)
        os.close(master)
    assert done.get("code") == 0
    assert "hello there" in text  # the terminal echoes what was typed
    assert "[4 message(s) in history]" in text and "user: tell me more" in text
    assert "[conversation reset]" in text and "[0 message(s) in history]" in text
    first_history = text.split("[4 message(s) in history]")[1].split(">>> ")[0]
    assert first_history.count("assistant:") == 2 and session.history == []


@pytest.mark.slow
def test_chat_command_in_a_subprocess_terminal(tiny_llama):
    """The real command in its own process with a pty as stdin/stdout (readline input path)."""
    master, slave = pty.openpty()
    code = ("import sys; from lmpipeline.commands.chat_cmd import chat_command; "
            f"sys.exit(chat_command({str(tiny_llama)!r}, temperature=0, max_new_tokens=4))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=slave, stdout=slave, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    try:
        text = _converse(master)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert "[4 message(s) in history]" in text and "[0 message(s) in history]" in text
