"""Training data: corpus reading, FIM rewriting, packing, chat examples with assistant-only labels, and the
deterministic sample order that makes resume exact.

Pretraining documents become `BOS text EOS`; a `fim_rate` fraction of them is first rewritten to PSM
fill-in-the-middle at the character level, as DeepSeek-Coder does:
    BOS <｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>middle EOS
All documents are concatenated into one token stream and cut into blocks of seq_len + 1 tokens (packing
without cross-document masking, as V3 pre-trains). Sample j of the run is block perm_e[j mod n] of epoch
e = j // n, with a fixed permutation per (seed, epoch): the data position of a run is one integer.
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
import re
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from selfseek.train.config import TrainConfigError
from selfseek.train.tokenizer_train import BOS, EOS, FIM_BEGIN, FIM_END, FIM_HOLE

STDLIB = "@stdlib"
IGNORE = -100  # target id that carries no loss


@dataclass(frozen=True)
class Document:
    source: str  # file path, or path:line for JSONL records
    text: str


# ---- corpus -------------------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The Python standard library's own *.py sources (no site-packages, no test suites)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))


def _files_of(source: str, extensions: Sequence[str]) -> list[Path]:
    if source == STDLIB:
        return stdlib_files()
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and (not extensions or p.suffix in extensions))
    matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
    return [p for p in matches if p.is_file()]


def jsonl_records(path: Path, errors: str = "strict") -> Iterator[tuple[str, object]]:
    """("file:line", parsed value) of each non-blank line of a JSONL file; a line that is not JSON is an error
    naming its file and line. `errors`: how undecodable UTF-8 is read (str.decode's argument)."""
    for n, line in enumerate(path.read_text(encoding="utf-8", errors=errors).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainConfigError(f"{path}:{n}: not valid JSON ({e})") from None
        yield f"{path}:{n}", record


def _read_jsonl(path: Path, text_key: str) -> list[Document]:
    docs = []
    for where, record in jsonl_records(path, errors="replace"):
        text = record if isinstance(record, str) else record.get(text_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise TrainConfigError(f"{where}: expected a string or an object with a {text_key!r} string field")
        docs.append(Document(where, text))
    return docs


def read_documents(
    sources: Sequence[str], extensions: Sequence[str] = (), text_key: str = "text", max_docs: int | None = None
) -> list[Document]:
    """Documents of text files (one each), folders (recursive, filtered by extension), globs, JSONL files
    (one per line) and `@stdlib`. Empty documents are dropped; no document at all is an error."""
    if isinstance(sources, str):
        sources = [sources]
    docs: list[Document] = []
    for src in sources:
        files = _files_of(src, extensions)
        if not files:
            raise TrainConfigError(f"corpus source {src!r}: no such file or folder, and no file matches it as a glob")
        for f in files:
            if f.suffix == ".jsonl":
                docs += [d for d in _read_jsonl(f, text_key) if d.text.strip()]
            else:
                text = f.read_text(encoding="utf-8", errors="replace")
                if text.strip():
                    docs.append(Document(str(f), text))
            if max_docs is not None and len(docs) >= max_docs:
                return docs[:max_docs]
    if not docs:
        raise TrainConfigError(f"corpus {list(sources)}: no documents (every file is empty)")
    return docs


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


def split_holdout(docs: list, fraction: float, seed: int, key=lambda d: d.source) -> tuple[list, list]:
    """Hold out about `fraction` of the documents for validation, chosen by a stable hash of their name
    (adding files to a corpus does not reshuffle the split). At least one when there are two or more."""
    if fraction <= 0 or len(docs) < 2:
        return list(docs), []
    h = [_unit_hash(f"{seed}:{key(d)}") for d in docs]
    valid = {i for i, u in enumerate(h) if u < fraction}
    if not valid:
        valid = {min(range(len(docs)), key=h.__getitem__)}
    if len(valid) == len(docs):
        valid.discard(max(range(len(docs)), key=h.__getitem__))
    return [d for i, d in enumerate(docs) if i not in valid], [d for i, d in enumerate(docs) if i in valid]


# ---- FIM and packing ----------------------------------------------------------------------------------


def fim_split(text: str, rng: random.Random) -> tuple[str, str, str]:
    """Two uniform cut points over the characters: (prefix, middle, suffix)."""
    a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
    return text[:a], text[a:b], text[b:]


def encode_documents(
    docs: Sequence[Document], tokenizer, fim_rate: float, seed: int, bos_id: int | None = None,
    eos_id: int | None = None,
) -> np.ndarray:
    """One int32 token stream: each document `BOS ... EOS`, a fim_rate fraction in PSM order.

    `tokenizer` is a `tokenizers.Tokenizer`; documents are encoded in one parallel batch. BOS/EOS default
    to DeepSeek's strings.
    """
    ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOS, FIM_BEGIN, FIM_HOLE, FIM_END)}
    ids[BOS] = ids[BOS] if bos_id is None else bos_id
    ids[EOS] = ids[EOS] if eos_id is None else eos_id
    missing = [t for t, i in ids.items() if i is None and (t in (BOS, EOS) or fim_rate > 0)]
    if missing:
        raise TrainConfigError(f"the tokenizer lacks special token(s) {missing} needed for pretraining")
    rng = random.Random(seed)
    texts: list[str] = []
    layout: list[int] = []  # pieces per document: 1 plain, 3 FIM (prefix, suffix, middle)
    for d in docs:
        if fim_rate > 0 and rng.random() < fim_rate:
            pre, mid, suf = fim_split(d.text, rng)
            texts += [pre, suf, mid]
            layout.append(3)
        else:
            texts.append(d.text)
            layout.append(1)
    encoded = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    out: list[int] = []
    i = 0
    for n in layout:
        if n == 1:
            out += [ids[BOS], *encoded[i], ids[EOS]]
        else:
            pre, suf, mid = encoded[i : i + 3]
            out += [ids[BOS], ids[FIM_BEGIN], *pre, ids[FIM_HOLE], *suf, ids[FIM_END], *mid, ids[EOS]]
        i += n
    return np.asarray(out, dtype=np.int32)


class PackedBlocks:
    """A token stream cut into blocks of seq_len + 1; item i -> (inputs, targets), both [seq_len]."""

    def __init__(self, stream: np.ndarray, seq_len: int, name: str = "corpus"):
        if len(stream) < seq_len + 1:
            raise TrainConfigError(
                f"{name}: {len(stream)} tokens, fewer than one sequence of data.seq_len + 1 = {seq_len + 1}; "
                "add documents or lower data.seq_len"
            )
        self.stream, self.seq_len = stream, seq_len
        self.n = (len(stream) - 1) // seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = torch.from_numpy(self.stream[i * self.seq_len : (i + 1) * self.seq_len + 1].astype(np.int64))
        return block[:-1], block[1:]


# ---- chat examples (SFT) ------------------------------------------------------------------------------


class Conversation(list):
    """A conversation's messages (a plain list of {role, content} dicts) and where it came from (file:line)."""

    source: str = "<memory>"


def read_chat_jsonl(paths: Sequence[str]) -> list[Conversation]:
    """Conversations from JSONL files of {"messages": [{"role": ..., "content": ...}, ...]}; each bad line is an
    error naming its file and line."""
    if isinstance(paths, str):
        paths = [paths]
    out = []
    for src in paths:
        files = _files_of(src, [".jsonl"])
        if not files:
            raise TrainConfigError(f"chat data {src!r}: no such file, folder or glob match")
        for f in files:
            for where, record in jsonl_records(f):
                msgs = record.get("messages") if isinstance(record, dict) else None
                if not isinstance(msgs, list) or not msgs or not all(
                        isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content") or "", str) for m in msgs):
                    raise TrainConfigError(f"{where}: not a conversation: expected an object with a 'messages' list "
                                           "of {\"role\": str, \"content\": str}")
                if not any(m["role"] == "assistant" for m in msgs):
                    raise TrainConfigError(f"{where}: conversation has no assistant message to learn from")
                conv = Conversation(msgs)
                conv.source = where
                out.append(conv)
    if not out:
        raise TrainConfigError(f"chat data {list(paths)}: no conversations")
    return out


THINK = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


def with_reasoning(messages: list[dict], think: str) -> list[dict]:
    """R1-style reasoning of assistant turns, kept ("keep": a `reasoning_content` field becomes the
    `<think>...</think>` block before the answer, as R1 writes it) or dropped ("drop": both removed)."""
    if think not in ("keep", "drop"):
        raise TrainConfigError(f"data.think must be 'keep' or 'drop', not {think!r}")
    out = []
    for m in messages:
        if m["role"] == "assistant":
            m = dict(m)
            reasoning = m.pop("reasoning_content", None)
            if think == "drop":
                m["content"] = THINK.sub("", m.get("content") or "", count=1)
            elif reasoning:
                m["content"] = f"<think>\n{reasoning}\n</think>\n\n{m.get('content') or ''}"
        out.append(m)
    return out


def encode_chat(
    messages: list[dict], tokenizer, max_len: int | None = None, think: str = "keep"
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and labels that equal the ids on assistant tokens (the
    reply and its end-of-turn token) and IGNORE elsewhere.

    Assistant spans are found by rendering prefixes: message i's reply starts where
    render(messages[:i], add_generation_prompt=True) ends and stops where render(messages[:i+1]) ends.
    That needs a template that marks the assistant turn (the generation prompt adds something) and renders
    prefixes as prefixes of the whole (DeepSeek's, Qwen's and Llama's do); else an error naming the conversation.
    `tokenizer` is a selfseek.tokenizer.Tokenizer with a chat template.
    """
    where = getattr(messages, "source", "<conversation>")
    messages = with_reasoning(list(messages), think)

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen)

    ids = tokenizer.encode(render(messages, False))
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        if prompt == render(messages[:i], False):
            raise TrainConfigError(
                f"{where}: the chat template has no assistant marker (add_generation_prompt adds nothing), so the "
                "assistant's tokens cannot be told from the prompt's")
        start, upto = tokenizer.encode(prompt), tokenizer.encode(render(messages[: i + 1], False))
        if ids[: len(start)] != start or ids[: len(upto)] != upto:
            raise TrainConfigError(
                f"{where}: the chat template does not render this conversation's prefixes as prefixes of the whole "
                f"(message {i}), so its assistant tokens cannot be located")
        if think == "keep" and "<think>" in (m.get("content") or "") and "<think>" not in tokenizer.decode(
                ids[len(start): len(upto)]):
            raise TrainConfigError(
                f"{where}: data.think is 'keep' but the chat template drops the assistant's <think> reasoning; "
                "set data.think=drop")
        labels[len(start) : len(upto)] = ids[len(start) : len(upto)]
    if max_len is not None:
        ids, labels = ids[: max_len + 1], labels[: max_len + 1]
    return ids, labels


class ChatExamples:
    """Encoded conversations; item i -> (inputs, targets) with targets = labels shifted left by one.

    pack: micro-batches concatenate their conversations into one row with no padding, each attending only to
    itself with positions from 0 (see `collate`)."""

    def __init__(self, conversations: list[list[dict]], tokenizer, max_len: int, think: str = "keep",
                 pack: bool = False):
        self.items, self.pack = [], pack
        for msgs in conversations:
            ids, labels = encode_chat(msgs, tokenizer, max_len, think)
            if len(ids) >= 2 and any(t != IGNORE for t in labels[1:]):
                self.items.append((torch.tensor(ids[:-1]), torch.tensor(labels[1:])))
        if not self.items:
            raise TrainConfigError("chat data: no conversation has assistant tokens within data.max_len")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


# ---- order and batching -------------------------------------------------------------------------------


class Order:
    """Sample j of a run -> dataset index: a fresh permutation of the n items every epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [self._perm(j // self.n)[j % self.n] for j in range(start, start + count)]


def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int, pack: bool = False):
    """Right-pad to the longest item: inputs with pad_id, targets with IGNORE (causal attention lets
    right padding change nothing before it) -> (inputs [b, s], targets [b, s]).

    pack: the items concatenated into one row without padding -> (inputs [1, T], targets [1, T], lengths): the
    model then runs each item as its own sequence (block-diagonal attention, positions from 0; losses.lm_losses).
    """
    if pack:
        return (torch.cat([x for x, _ in items])[None], torch.cat([y for _, y in items])[None],
                [len(x) for x, _ in items])
    n = max(len(x) for x, _ in items)
    inputs = torch.full((len(items), n), pad_id, dtype=torch.long)
    targets = torch.full((len(items), n), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(items):
        inputs[i, : len(x)] = x
        targets[i, : len(y)] = y
    return inputs, targets


def micro_batches(
    dataset, order: Order, position: int, batch_size: int, micro: int, rank: int, world: int, pad_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's micro-batches of the global batch of samples [position, position + batch_size).

    Rank r takes the r-th contiguous slice, so any process count sees the same global batch.
    """
    per_rank = batch_size // world
    idx = order.indices(position + rank * per_rank, per_rank)
    pack = getattr(dataset, "pack", False)
    return [collate([dataset[i] for i in idx[j : j + micro]], pad_id, pack) for j in range(0, per_rank, micro)]


def stream_cache_key(docs: Sequence[Document], tokenizer_json: Path, fim_rate: float, seed: int) -> str:
    h = hashlib.sha1()
    h.update(tokenizer_json.read_bytes())
    h.update(f"{fim_rate}:{seed}:{len(docs)}".encode())
    for d in docs:
        h.update(d.source.encode())
        h.update(hashlib.sha1(d.text.encode("utf-8", "replace")).digest())
    return h.hexdigest()[:16]
