"""Tools built on the model and the engine: chat/generate CLI, doctor, perplexity evaluation."""
