"""Retrieval: ``embeddings`` (the embedding model), ``index`` (chunks embedded into LanceDB, updated incrementally),
``retrieval`` (top-k search with an optional relevance cut-off) and ``cli`` (``engrain index``). The RAG memory
that answers with retrieved chunks is ``memory/rag.py``."""
