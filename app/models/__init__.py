"""Where model weights come from: local directories, the Hugging Face cache, GGUF files, the catalog."""
