"""selfseek: a self-hosted DeepSeek."""

from selfseek.llm import LLM
from selfseek.outputs import CompletionOutput, RequestOutput
from selfseek.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
