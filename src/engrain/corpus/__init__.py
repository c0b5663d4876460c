"""Documents in: one parser per format, chunking, and the corpus files every later stage reads."""
