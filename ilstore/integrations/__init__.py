"""Integrations with inference engines (vLLM) and launchers."""
