"""`lmpipeline chat PATH`: talk to a model in the terminal (streamed, multi-turn; /reset, /system, /exit)."""

from __future__ import annotations

import argparse
from typing import TextIO

DTYPES = ("auto", "bfloat16", "float16", "float32")


def chat_command(path: str, *, base_model: str | None = None, dtype: str = "auto", system: str | None = None,
                 max_new_tokens: int | None = None, temperature: float = 0.7, top_p: float = 0.9,
                 chat_template: str | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
                 allow_pickle_weights: bool = False) -> int:
    from lmpipeline.evaluate import generation as gen
    from lmpipeline.evaluate.chat import HELP, ChatSession, default_max_new_tokens, run_chat

    spec = gen.resolve_model(path, base_model)
    model, tokenizer = gen.load_spec(spec, dtype=dtype, allow_pickle_weights=allow_pickle_weights)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(model)
    session = ChatSession(model, tokenizer, chat_template=chat_template, system=system,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    banner = f"chatting with {spec.label} ({'greedy' if temperature <= 0 else f'temperature {temperature}'}). {HELP}"
    return run_chat(session, stdin=stdin, stdout=stdout, banner=banner)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from lmpipeline.commands import add_allow_pickle_weights, positive_int, probability, temperature

    p = subparsers.add_parser("chat", help="interactive chat with a model",
                              description="Chat with a model: streamed answers, multi-turn history; "
                                          "/reset, /system TEXT, /history, /exit.")
    p.add_argument("path", help="run folder, stage folder, adapter folder, package folder or model folder")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                   help="longest answer (default: a quarter of the model's context length, e.g. 128 tokens of a "
                        "512-token model or 32,768 of 131,072, so the conversation keeps the rest)")
    p.add_argument("--temperature", type=temperature, default=0.7, help="sampling temperature; 0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=probability, default=0.9, help="nucleus sampling threshold (default 0.9)")
    p.add_argument("--base-model", metavar="PATH_OR_ID", help="base model for an adapter, if not the recorded one")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="load dtype (auto: bf16 on GPU, else float32)")
    p.add_argument("--chat-template", metavar="NAME_OR_JINJA", help="override the tokenizer's chat template")
    add_allow_pickle_weights(p)
    p.set_defaults(func=lambda a: chat_command(
        a.path, base_model=a.base_model, dtype=a.dtype, system=a.system, max_new_tokens=a.max_new_tokens,
        temperature=a.temperature, top_p=a.top_p, chat_template=a.chat_template,
        allow_pickle_weights=a.allow_pickle_weights))
    return p
