"""LoadError, in a module of its own: the checkpoint readers the frontend runs before it spawns
the engine ranks (gguf_files.py, gguf_tokenizer.py) raise it without importing torch."""


class LoadError(ValueError):
    """A checkpoint that does not fit the model: missing tensors, wrong shapes, bad files."""
