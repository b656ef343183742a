"""The toy world: procedural fine-grained scenes, a tiny Qwen2-VL base and its gap."""
