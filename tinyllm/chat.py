"""`python -m tinyllm chat`: a multi-turn conversation through the model's chat template.

The model itself remembers nothing between answers: every turn, the whole conversation (system
message, earlier exchanges, the new message) is rendered by the chat template and run as one prompt.
`Conversation` is that history, `ChatSession` turns a message into a streamed answer and records it,
and `run` is the read-answer loop the command line drives (a terminal or a pipe, one message a line).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .api import check_utf8
from .errors import TinyLLMError

COMMANDS = {"/reset": "forget the conversation (the system message stays)", "/exit": "leave (so does Ctrl-D)"}


@dataclass
class Conversation:
    """The system message and the exchanges so far, oldest first, as the chat template wants them."""

    system: str | None = None
    exchanges: list[tuple[str, str]] = field(default_factory=list)  # (user message, assistant answer)

    def messages(self, new_message: str | None = None) -> list[dict]:
        """The conversation as chat-template messages, ending with `new_message` from the user if given."""
        messages = [{"role": "system", "content": self.system}] if self.system is not None else []
        for user, assistant in self.exchanges:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        if new_message is not None:
            messages.append({"role": "user", "content": new_message})
        return messages

    def reset(self) -> None:
        self.exchanges.clear()


class ChatSession:
    """A model and a Conversation: `reply(message)` streams the answer and adds the exchange.

    When the conversation no longer fits the context (with room left for an answer), the oldest
    exchanges are dropped first; the system message is always kept. `notify` receives a line saying so.
    """

    def __init__(self, model, system: str | None = None, notify: Callable[[str], None] = lambda line: None,
                 max_new_tokens: int = 512, stop=(), **sampling):
        if not model.tokenizer.chat_template:
            raise TinyLLMError(f"{model.path} has no chat template, so it cannot hold a conversation "
                               "(`tinyllm generate --raw` continues a prompt without one)")
        self.model = model
        self.conversation = Conversation(system)
        self.notify = notify
        self.generation = {"max_new_tokens": max_new_tokens, "stop": stop, **sampling}
        # Room kept for the answer; at most half the context, so that some history always fits.
        self.answer_room = min(max_new_tokens, model.config.max_seq_len // 2)

    def prompt_ids(self, message: str) -> list[int]:
        """Token ids of the conversation plus `message`, after dropping the oldest exchanges that do not fit."""
        check_utf8("the message", message)
        budget = self.model.config.max_seq_len - self.answer_room
        ids = self.model.chat_ids(self.conversation.messages(message))
        dropped = 0
        while len(ids) > budget and self.conversation.exchanges:
            self.conversation.exchanges.pop(0)
            dropped += 1
            ids = self.model.chat_ids(self.conversation.messages(message))
        if dropped:
            kept = "; the system message is kept" if self.conversation.system is not None else ""
            self.notify(f"the conversation outgrew the model's context of {self.model.config.max_seq_len} tokens: "
                        f"dropped the oldest {dropped} exchange(s){kept}")
        return ids

    def rendered_prompt(self, message: str) -> str:
        """The text the model reads for `message` now: the conversation through the chat template."""
        return self.model.tokenizer.apply_chat_template(self.conversation.messages(message))

    def reply(self, message: str, ids: list[int] | None = None) -> Iterator[str]:
        """Stream the answer to `message` (for prompt `ids`, default `prompt_ids(message)`). The exchange is
        recorded when the answer ends, also when it is cut short: the history holds what was shown."""
        if ids is None:
            ids = self.prompt_ids(message)
        pieces = self.model.generate_text(ids, **self.generation)  # checked here, before the first piece
        return self._recorded(message, pieces)

    def _recorded(self, message: str, pieces: Iterator[str]) -> Iterator[str]:
        answer = []
        try:
            for piece in pieces:
                answer.append(piece)
                yield piece
        finally:  # also on Ctrl-C, and when the caller closes the stream early
            pieces.close()
            self.conversation.exchanges.append((message, "".join(answer)))


def run(session: ChatSession, read_line: Callable[[], str | None], write: Callable[[str], None],
        log: Callable[[str], None], *, interactive: bool, show_prompt: bool = False,
        after_answer: Callable[[], None] = lambda: None) -> None:
    """Read messages until /exit or the end of input, streaming each answer through `write`.

    `read_line` returns the next line without its newline, or None at the end of input. Ctrl-C during an
    answer ends that answer only; at the prompt it propagates (the command exits 130). An error in a
    message is reported through `log` and the session goes on when a person is typing (`interactive`);
    from a pipe it is raised, so a script sees the failure.
    """
    while (line := read_line()) is not None:
        message = line.strip()
        if not message:
            continue
        if _is_command(message):
            if message == "/exit":
                return
            if message == "/reset":
                session.conversation.reset()
                log("(conversation cleared)")
            else:
                log(f"unknown command {message}; commands: " + ", ".join(f"{c} ({what})" for c, what in COMMANDS.items()))
            continue
        try:
            _answer(session, message, write, log, show_prompt)
        except TinyLLMError as e:
            if not interactive:
                raise
            log(f"error: {e}")
            continue
        after_answer()


def _is_command(message: str) -> bool:
    """A single word starting with `/`; `/usr/bin is where?` is a message."""
    return message.startswith("/") and len(message.split()) == 1


def _answer(session: ChatSession, message: str, write, log, show_prompt: bool) -> None:
    ids = session.prompt_ids(message)
    if show_prompt:
        log(f"--- prompt ({len(ids)} tokens) ---\n{session.rendered_prompt(message)}\n--- answer ---")
    answer = session.reply(message, ids)
    try:
        for piece in answer:
            write(piece)
    except KeyboardInterrupt:
        answer.close()  # records what was shown so far
        write("\n")
        log("(answer stopped)")
        return
    write("\n")


def line_reader(interactive: bool, prompt: str = "> ") -> Callable[[], str | None]:
    """The next message from standard input: with line editing on a terminal, else one line of the pipe.
    Bytes that are not UTF-8 are kept as surrogates, so the message check names them instead of a crash."""
    if interactive:
        import readline  # noqa: F401  (importing it gives input() line editing and history)

        def read_from_terminal():
            try:
                return input(prompt)
            except EOFError:  # Ctrl-D
                print(file=sys.stderr)
                return None
        return read_from_terminal

    def read_from_pipe():
        raw = sys.stdin.buffer.readline()
        return raw.decode("utf-8", "surrogateescape").rstrip("\r\n") if raw else None
    return read_from_pipe
