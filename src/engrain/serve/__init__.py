"""``engrain serve``: every memory of a workspace behind an OpenAI-compatible API (app.py), one worker batching
requests per memory (scheduler.py) over one base model with shared weights (engine.py), and a playground page."""
