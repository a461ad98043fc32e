"""Changes to vLLM's behaviour, each in its own module, applied in every vLLM process by llm_server/vllm_plugin.py."""
