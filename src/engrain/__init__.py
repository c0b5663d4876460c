"""engrain: make a language model know a folder of documents, and measure which way works best."""

__version__ = "0.1.0"
