"""Built-in provider adapters (openai, gemini, ollama) and the Provider protocol."""
