"""The HTTP server: DeepSeek's and OpenAI's APIs, Ollama's, and operations endpoints, over the AsyncEngine.

Needs the `server` extra (fastapi, uvicorn, llguidance, prometheus-client). See app.py for `selfseek serve`.
"""

from selfseek.server.app import build_service, create_app
from selfseek.server.service import ModelService, ServerConfig

__all__ = ["ModelService", "ServerConfig", "build_service", "create_app"]
