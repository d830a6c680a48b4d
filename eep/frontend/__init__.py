"""The front-end: OpenAI-compatible HTTP (completions and chat), the model's tokenizer and the
text of each request (detokenized incrementally, cut at stop strings), the request log, and the
assignment of requests to live slots (re-queued on survivors when a slot leaves the view)."""
