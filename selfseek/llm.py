"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`.

Decoding here is the plain loop: prefill the prompt into a contiguous per-request cache (expanded MLA),
then one token at a time (absorbed MLA over the latent cache).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from selfseek.engine.sampler import sample
from selfseek.outputs import CompletionOutput, RequestOutput
from selfseek.sampling_params import SamplingParams
from selfseek.tokenizer import IncrementalDetokenizer, Tokenizer
from selfseek.weights import load_model

Prompt = str | Sequence[int]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    def __init__(
        self,
        model: str | Path,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device | None = None,
        progress: bool = True,
    ):
        self.device = torch.device(device or default_device())
        self.model, self.tokenizer = load_model(model, dtype, self.device, progress)
        self.config = self.model.config

    # ---- public API -------------------------------------------------------------------------------
    def generate(
        self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt; a prompt is a string or a list of token ids."""
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        results = []
        for prompt in prompts:
            ids = self._prompt_ids(prompt)
            generator = _generator(params.seed)
            out = RequestOutput(
                request_id=uuid.uuid4().hex,
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=ids,
                finished=True,
            )
            for i in range(params.n):
                completion = CompletionOutput(index=i, text="", token_ids=[], finish_reason=None)
                for _ in self._decode(ids, params, generator, completion):
                    pass
                out.outputs.append(completion)
            results.append(out)
        return results

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **template_kwargs,
    ) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.render_chat(c, add_generation_prompt, tools, **template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools=None, **kw) -> str:
        return self._need_tokenizer().apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **kw
        )

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one completion as it is generated."""
        params = sampling_params or SamplingParams()
        completion = CompletionOutput(index=0, text="", token_ids=[], finish_reason=None)
        yield from self._decode(self._prompt_ids(prompt), params, _generator(params.seed), completion)

    # ---- internals --------------------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (tokenizer.json); pass prompts as token-id lists")
        return self.tokenizer

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        ids = self._need_tokenizer().encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("prompt is empty")
        if any(not 0 <= t < self.config.vocab_size for t in ids):
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.config.max_position_embeddings:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the model's context is {self.config.max_position_embeddings}"
            )
        return ids

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            if self.tokenizer is not None:
                ids |= self.tokenizer.stop_ids
            eos = self.config.eos_token_id
            ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    @torch.inference_mode()
    def _decode(
        self, prompt_ids: list[int], params: SamplingParams, generator, out: CompletionOutput
    ) -> Iterator[str]:
        """Fill `out` token by token; yield text deltas (held back while they could start a stop string)."""
        max_new = min(params.max_tokens, self.config.max_position_embeddings - len(prompt_ids))
        cache = self.model.new_cache(1, len(prompt_ids) + max_new)
        stop_ids = self._stop_ids(params)
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer else None
        holdback = max((len(s) for s in params.stop), default=1) - 1
        emitted = 0
        if params.logprobs is not None:
            out.logprobs = []

        tokens = torch.tensor([prompt_ids], device=self.device)
        pos = 0
        while True:
            logits = self.model(tokens, start_pos=pos, cache=cache)[0, -1]
            pos += tokens.shape[1]
            token, logprobs = sample(logits, params, generator)
            out.token_ids.append(token)
            if out.logprobs is not None:
                out.logprobs.append(logprobs)
            if token in stop_ids:
                out.finish_reason, out.stop_reason = "stop", token
            elif detok is not None:
                out.text += detok.add(token)
                for s in params.stop:
                    cut = out.text.find(s, max(0, emitted - len(s)))
                    if cut != -1:
                        out.text, out.finish_reason, out.stop_reason = out.text[:cut], "stop", s
                        break
            if out.finish_reason is None and len(out.token_ids) >= max_new:
                out.finish_reason = "length"
            if out.finish_reason is not None:
                if detok is not None and not isinstance(out.stop_reason, str):
                    out.text += detok.flush()  # a stop string's text was cut; otherwise release held bytes
                yield out.text[emitted:]
                return
            safe = len(out.text) - holdback
            if safe > emitted:
                yield out.text[emitted:safe]
                emitted = safe
            tokens = torch.tensor([[token]], device=self.device)


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)
