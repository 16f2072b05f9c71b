"""Using a reasoning model: ``thinkrl serve`` (an OpenAI-compatible HTTP server with
continuous batching and DeepSeek's ``reasoning_content``) and ``thinkrl chat`` (a terminal
chat). docs/serve.md describes both."""
