"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))` and `LLM.chat(messages)`, run on
the engine (continuous batching over a paged KV cache): all prompts are submitted at once."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from selfseek.engine.engine import EngineArgs, LLMEngine
from selfseek.engine.output_processor import OutputProcessor, step_with_text
from selfseek.outputs import CompletionOutput, RequestOutput
from selfseek.sampling_params import SamplingParams
from selfseek.weights import load_model

Prompt = str | Sequence[int]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device | None = None,
        progress: bool = True,
        quantize: int | None = None,
        generation_config: str | Path = "auto",
        **engine_args,
    ):
        """model: a checkpoint folder, a .gguf file, or a model name: the default model (None), an Ollama name,
        a Hugging Face id in the local cache (selfseek/stores.py).
        quantize: 8 or 4 to keep linear weights in int8 / int4 blocks.
        generation_config: "auto" (the model's sampling defaults), "none"/"vllm", or a folder with one.
        engine_args: fields of EngineArgs (kv_cache_memory, block_size, max_num_seqs, ..., lora: {name: PEFT
        adapter folder} to serve adapters a request picks with generate(lora_name=...)), and the parallel sizes
        tensor_parallel_size, expert_parallel_size, data_parallel_size (selfseek/distributed: worker processes)."""
        self.device = torch.device(device or default_device())
        parallel = {k: engine_args.pop(k) for k in ("tensor_parallel_size", "expert_parallel_size",
                                                     "data_parallel_size") if k in engine_args}
        if any(v > 1 for v in parallel.values()):  # ranks in other processes (selfseek/distributed)
            from selfseek.distributed.launch import check_engine_args, load_parallel

            check_engine_args(engine_args, parallel.get("data_parallel_size", 1))
            self.model, self.tokenizer = load_parallel(model, dtype, self.device, progress, quantize,
                                                       generation_config, **parallel)
        else:
            self.model, self.tokenizer = load_model(model, dtype, self.device, progress, quantize, generation_config)
        self.config = self.model.config
        # SamplingParams fields a request gets when it leaves them out (vLLM's generation-config defaults).
        self.generation_defaults: dict = dict(self.model.generation_defaults)
        self.engine = LLMEngine(self.model, self.tokenizer, EngineArgs(**engine_args))
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_name: str | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt (a string or a list of token ids), in order. lora_name: run them under
        that served adapter (LLM(..., lora={name: PEFT folder})), else as each SamplingParams.lora_name says."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or self.get_default_sampling_params()
        params = list(params) if isinstance(params, list | tuple) else [params] * len(prompts)
        if lora_name is not None:
            params = [dataclasses.replace(p, lora_name=lora_name) for p in params]
        outputs: dict[str, RequestOutput] = {}
        for prompt, p in zip(prompts, params, strict=True):
            rid = f"gen-{next(self._ids)}"
            ids = self.engine.prepare(prompt, p)
            outputs[rid] = RequestOutput(
                request_id=rid, prompt=prompt if isinstance(prompt, str) else None, prompt_token_ids=ids,
                outputs=[CompletionOutput(i, "", [], None, [] if p.logprobs is not None else None)
                         for i in range(p.n)],
            )
            self.engine.add_request(rid, ids, p)
            self.processor.add_request(rid, ids, p)
        while self.engine.has_work():
            for d in step_with_text(self.engine, self.processor):
                out = outputs[d.request_id]
                c = out.outputs[d.index]
                c.text += d.text
                c.token_ids += d.token_ids
                if d.logprobs:
                    c.logprobs += d.logprobs
                if d.finish_reason is not None:
                    c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
                    if d.error:
                        raise RuntimeError(d.error)
                out.num_cached_tokens = d.num_cached_tokens
        for out in outputs.values():
            out.finished = True
        return list(outputs.values())

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation defaults (used when generate/stream get none)."""
        return SamplingParams(**self.generation_defaults)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        lora_name: str | None = None,
        **template_kwargs,
    ) -> list[RequestOutput]:
        """Render each conversation with the checkpoint's chat template, then generate (under the served
        adapter `lora_name`, if given)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.render_chat(c, add_generation_prompt, tools, **template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, lora_name=lora_name)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools=None, **kw) -> str:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (tokenizer.json); pass prompts as token-id lists")
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **kw
        )

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one completion as it is generated."""
        params = sampling_params or self.get_default_sampling_params()
        rid = f"stream-{next(self._ids)}"
        ids = self.engine.prepare(prompt, params)
        self.engine.add_request(rid, ids, params)
        self.processor.add_request(rid, ids, params)
        try:
            while self.engine.has_work():
                for d in step_with_text(self.engine, self.processor):
                    if d.request_id == rid:
                        if d.text:
                            yield d.text
                        if d.error:
                            raise RuntimeError(d.error)
        finally:
            self.engine.abort(rid)
            self.processor.remove(rid)
