"""Split streamed model text into reasoning (between <think> and </think>) and the answer.

Three shapes occur with DeepSeek models, and all arrive as text deltas of any size, so a tag can be
split across deltas (a tokenizer without a <think> token spells it in pieces; stop-string holdback can
cut one too):
- the prompt already opened reasoning (R1's template ends with "<think>\\n", V3.1 thinking mode with
  "<think>"): the output starts inside reasoning and only "</think>" comes out;
- the output opens it itself (R1-0528 style "<think>...</think>answer");
- no tags at all: everything is the answer (or, when the prompt opened reasoning and no "</think>"
  ever comes, everything is reasoning, as with a thought cut off by max_tokens).
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (text to hold back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningParser:
    """feed(text) -> (reasoning, content) new since the last call; finish() flushes what was held back."""

    def __init__(self, in_reasoning: bool = False, start: str = THINK_START, end: str = THINK_END):
        self.start, self.end = start, end
        # "opening": nothing but whitespace seen yet, so a start tag may still come
        self.state = "reasoning" if in_reasoning else "opening"
        self._buf = ""
        self._strip_content = False  # drop the whitespace between </think> and the answer

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning, content = "", ""
        while self._buf:
            if self.state == "opening":
                head = self._buf.lstrip()
                if head.startswith(self.start):
                    self._buf, self.state = head[len(self.start):], "reasoning"
                    continue
                if self.start.startswith(head):  # maybe the start of a tag: wait for more
                    break
                self.state = "content"
            elif self.state == "reasoning":
                cut = self._buf.find(self.end)
                if cut != -1:
                    reasoning += self._buf[:cut]
                    self._buf, self.state, self._strip_content = self._buf[cut + len(self.end):], "content", True
                    continue
                keep = partial_suffix(self._buf, self.end)
                reasoning += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                break
            else:
                if self._strip_content:
                    self._buf = self._buf.lstrip()
                    if not self._buf:
                        break
                    self._strip_content = False
                content += self._buf
                self._buf = ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """The held-back rest: an unfinished end tag is reasoning text, an unfinished start tag is content."""
        rest, self._buf = self._buf, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest.lstrip() if self._strip_content else rest

    @property
    def in_reasoning(self) -> bool:
        return self.state == "reasoning"
