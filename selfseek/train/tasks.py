"""Verifiable tasks for GRPO (and their SFT data): a prompt, a reference answer, a rule-based reward.

`arithmetic`: "a+b=" (or -, *) with operands 0..max_operand; the reward is 1 when the completion, with
surrounding whitespace removed, is exactly the result, else 0 (DeepSeek-R1's rule-based accuracy reward,
without the format reward).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from selfseek.train.config import TrainConfigError


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}]


class Arithmetic:
    name = "arithmetic"

    def __init__(self, max_operand: int = 9, ops: str = "+"):
        if not ops or set(ops) - set("+-*"):
            raise TrainConfigError(f"task.ops {ops!r}: use a combination of '+', '-' and '*'")
        if max_operand < 1:
            raise TrainConfigError(f"task.max_operand must be at least 1, got {max_operand}")
        self.max_operand, self.ops = max_operand, ops

    def problem(self, a: int, op: str, b: int) -> Problem:
        result = a + b if op == "+" else a - b if op == "-" else a * b
        return Problem(f"{a}{op}{b}=", str(result))

    def sample(self, rng: random.Random) -> Problem:
        return self.problem(rng.randint(0, self.max_operand), rng.choice(self.ops), rng.randint(0, self.max_operand))

    def problems(self, n: int, seed: int) -> list[Problem]:
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    @staticmethod
    def reward(completion: str, answer: str) -> float:
        return 1.0 if completion.strip() == answer else 0.0

    def write_jsonl(self, path: str | Path, n: int, seed: int, fmt: str = "chat") -> int:
        """`chat`: {"messages": [user, assistant]} for SFT; `prompts`: {"prompt", "answer"}."""
        with Path(path).open("w") as f:
            for p in self.problems(n, seed):
                if fmt == "chat":
                    rec = {"messages": [*p.messages(), {"role": "assistant", "content": p.answer}]}
                else:
                    rec = {"prompt": p.prompt, "answer": p.answer}
                f.write(json.dumps(rec) + "\n")
        return n


def make_task(name: str, **kwargs) -> Arithmetic:
    if name != "arithmetic":
        raise TrainConfigError(f"task.name {name!r}: unknown task; available: arithmetic")
    return Arithmetic(**kwargs)
