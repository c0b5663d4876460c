"""Memories: the ways a model can know the documents, behind one protocol (base.py)."""
