"""The front-end: OpenAI-compatible HTTP, the request log, and the assignment of requests to
live slots (re-queued on survivors when a slot leaves the view)."""
