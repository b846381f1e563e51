"""The TeleChat model: config, modeling, RoPE, kernels, losses and checkpoint I/O (no engine, no serving)."""
