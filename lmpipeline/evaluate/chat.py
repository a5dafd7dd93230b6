"""Interactive chat with a trained model.

A ChatSession keeps the conversation (multi-turn history), renders it with the chat template,
generates the next assistant turn with lmpipeline's engine and streams its text as the tokens come, whole
characters only (text_stream.IncrementalDecoder), to any text stream. By default an answer may use a
quarter of the model's context (default_max_new_tokens), leaving the rest for the history. `run_chat` is the read-eval-print loop over lines of input:

    /reset         forget the conversation (the system prompt stays)
    /system TEXT   set the system prompt (empty TEXT removes it) and start over
    /history       print the conversation so far
    /help          list the commands
    /exit, /quit   leave (so does end of input, Ctrl-D)

Sampling: temperature > 0 samples with top_p (seeded by the turn number, so a replayed conversation
gives the same answers); temperature 0 is greedy. When the conversation would
not fit the model's context (max_position_embeddings) with room for max_new_tokens, the oldest turns
are dropped from what the model sees (the history keeps them) and a note says how many.
Ctrl-C during an answer stops that answer and discards the turn; at the prompt it leaves.
Needs a chat template (the tokenizer's, or chat_template); raises UserError otherwise.
"""

from __future__ import annotations

import sys
from typing import TextIO

from lmpipeline.errors import UserError
from lmpipeline.evaluate import generation as gen
from lmpipeline.evaluate.text_stream import IncrementalDecoder
from lmpipeline.generation import GenerationEngine, Request

HELP = "commands: /reset, /system TEXT, /history, /help, /exit"


# An answer may take up to this share of the model's context; the rest is left for the conversation.
REPLY_CONTEXT_SHARE = 4
REPLY_TOKENS_UNKNOWN_CONTEXT = 512


def default_max_new_tokens(model) -> int:
    """The longest answer by default: a quarter of the model's context length (128 of a 512-token model),
    so that the history still fits beside the answer from the second turn on."""
    context = getattr(model.config, "max_position_embeddings", None)
    return max(1, context // REPLY_CONTEXT_SHARE) if context else REPLY_TOKENS_UNKNOWN_CONTEXT


class _TextStream:
    """The engine's on_tokens callback: writes the answer's text as its tokens come, whole characters only."""

    def __init__(self, tokenizer, out: TextIO):
        self.decoder = IncrementalDecoder(tokenizer)
        self.out = out

    def __call__(self, request: int, sample: int, ids: list[int]) -> None:
        self._write(self.decoder.push(ids))

    def finish(self) -> None:
        self._write(self.decoder.finish())

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


class ChatSession:
    """A conversation with one model: history, system prompt and streamed replies."""

    def __init__(self, model, tokenizer, *, chat_template: str | None = None, system: str | None = None,
                 max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9):
        self.model = model
        self.tokenizer = tokenizer
        self.template = gen.resolve_template(tokenizer, chat_template=chat_template)
        if self.template is None:
            raise UserError("this model's tokenizer has no chat template, so a conversation cannot be rendered",
                            key="chat_template", hint="pass --chat-template NAME (e.g. chatml) or a Jinja file")
        self.system = system or None
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.history: list[dict] = []
        self.dropped_turns = 0
        self.turns = 0
        # One token per read-back, so the answer streams as it is generated.
        self.engine = GenerationEngine(model, tokenizer, max_slots=1, sync_every=1)

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        self.system = (text or "").strip() or None
        self.reset()

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def _fit(self) -> list[int]:
        """Prompt ids of the conversation, dropping the oldest turns while it overflows the context."""
        limit = getattr(self.model.config, "max_position_embeddings", None)
        turns = list(self.history)
        dropped = 0
        while True:
            msgs = ([{"role": "system", "content": self.system}] if self.system else []) + turns
            ids = gen.encode_prompt(self.tokenizer, self.template, msgs)
            if limit is None or len(ids) + self.max_new_tokens <= limit or len(turns) <= 1:
                self.dropped_turns = dropped
                return ids
            # Drop a whole user/assistant exchange so the conversation still starts with a user turn.
            turns = turns[2:] if len(turns) > 2 else turns[1:]
            dropped += 1

    def reply(self, text: str, stream: TextIO | None = None) -> str:
        """Add a user turn, generate (streaming to `stream`), add and return the assistant turn."""
        self.history.append({"role": "user", "content": text})
        try:
            ids = self._fit()
            params = gen.sampling_params(self.tokenizer, self.template, max_new_tokens=self.max_new_tokens,
                                         temperature=self.temperature, top_p=self.top_p, seed=self.turns)
            streamer = _TextStream(self.tokenizer, stream) if stream is not None else None
            ((completion,),) = self.engine.generate([Request(ids, params)], on_tokens=streamer)
            if streamer is not None:
                streamer.finish()
        except BaseException:
            self.history.pop()  # an interrupted or failed answer leaves no half turn behind
            raise
        self.turns += 1
        answer = completion.text.strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def run_chat(session: ChatSession, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
             prompt: str = ">>> ", banner: str | None = None) -> int:
    """The interactive loop; returns 0 when the user leaves."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    use_input = stdin is sys.stdin and stdout is sys.stdout and sys.stdin.isatty()
    if use_input:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

    def say(text: str) -> None:
        stdout.write(text + "\n")
        stdout.flush()

    say(banner or f"chat ready. {HELP}")
    while True:
        try:
            if use_input:
                line = input(prompt)
            else:
                stdout.write(prompt)
                stdout.flush()
                line = stdin.readline()
                if not line:
                    say("")
                    return 0
        except EOFError:
            say("")
            return 0
        except KeyboardInterrupt:
            say("")
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            cmd = cmd.lower()
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                session.reset()
                say("[conversation reset]")
            elif cmd == "/system":
                session.set_system(arg)
                say(f"[system prompt {'set' if session.system else 'removed'}; conversation reset]")
            elif cmd == "/history":
                msgs = session.messages()
                say(f"[{len(session.history)} message(s) in history]")
                for m in msgs:
                    say(f"{m['role']}: {m['content']}")
            elif cmd == "/help":
                say(HELP)
            else:
                say(f"[unknown command {cmd}; {HELP}]")
            continue
        try:
            session.reply(line, stream=stdout)
        except KeyboardInterrupt:
            say("\n[answer interrupted; turn discarded]")
            continue
        say("")
        if session.dropped_turns:
            say(f"[{session.dropped_turns} earliest exchange(s) left out to fit the context]")
