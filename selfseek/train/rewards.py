"""Rule-based rewards as DeepSeek-R1 trained with (R1 paper §2.2.2): no learned reward model.

- accuracy: the final answer (after the reasoning, inside \\boxed{} when there is one) equals the reference;
- format: the reasoning sits in one <think>...</think> block, followed by a non-empty answer;
- unit tests: a program (the completion's fenced code, or all of it) passes tests run in a separate Python
  process with a timeout; a crash, a failed assert, a hang or a runaway output all score 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_NO_TAG = r"(?:(?!</?think>).)*"  # any text without a <think> or </think> tag
_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*\S{_NO_TAG}", re.DOTALL)
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def final_answer(completion: str) -> str:
    """The answer part of a completion: the text after the last </think> (all of it without one), the last
    \\boxed{...} in it when there is one, stripped."""
    text = completion.rsplit(THINK_CLOSE, 1)[-1]
    boxed = _last_boxed(text)
    return (boxed if boxed is not None else text).strip()


def _last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...}, braces balanced (\\boxed{\\frac{1}{2}} -> \\frac{1}{2})."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: no boxed answer


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer is exactly `answer` (surrounding whitespace aside), else 0.0."""
    return 1.0 if final_answer(completion) == answer.strip() else 0.0


def format_reward(completion: str) -> float:
    """1.0 for `<think>reasoning</think>answer` (one think block first, a non-empty answer after), else 0.0."""
    return 1.0 if _FORMAT.fullmatch(completion) else 0.0


def extract_code(completion: str) -> str:
    """The last fenced code block of the answer part (```python ... ```), or the whole answer part."""
    text = completion.rsplit(THINK_CLOSE, 1)[-1]
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


@dataclass
class UnitTestRun:
    passed: bool
    returncode: int | None  # None: killed at the timeout
    timed_out: bool
    output: str  # the tail of stdout + stderr, for logs

    @property
    def reward(self) -> float:
        return 1.0 if self.passed else 0.0


def run_unit_tests(program: str, tests: str, timeout: float = 5.0, max_output: int = 4096) -> UnitTestRun:
    """Run `program` then `tests` (asserts) as one script in a fresh, isolated Python process (-I: no user
    site, no PYTHON* variables) in a temporary directory; passed means exit status 0 within `timeout` s.

    The process leads its own session, so a timeout kills everything it started. Not a security sandbox:
    run untrusted completions in a container or VM as well.
    """
    with tempfile.TemporaryDirectory(prefix="selfseek-reward-") as tmp:
        script, log = Path(tmp) / "solution_test.py", Path(tmp) / "output.txt"
        script.write_text(f"{program}\n\n{tests}\n", encoding="utf-8")
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, str(script)], cwd=tmp, stdin=subprocess.DEVNULL, stdout=sink,
                stderr=subprocess.STDOUT, env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
                start_new_session=True,
            )
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            try:  # the script, and whatever it left running in its session
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        data = log.read_bytes()[-max_output:].decode(errors="replace")
    if timed_out:
        return UnitTestRun(False, None, True, data)
    return UnitTestRun(proc.returncode == 0, proc.returncode, False, data)


# Run in the child before the script (not a preexec_fn, which is unsafe in a process with threads): files it
# writes, its output included, stop at 16 MiB (SIGXFSZ ends it); no core dumps.
_BOOT = """import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def unit_test_reward(completion: str, tests: str, timeout: float = 5.0) -> float:
    """1.0 when the completion's code passes `tests` within `timeout` seconds, else 0.0."""
    return run_unit_tests(extract_code(completion), tests, timeout).reward
