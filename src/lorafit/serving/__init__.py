"""`lorafit serve`: adapters behind an OpenAI-compatible HTTP server, requests for any adapter batched together.

`engine` owns the models (one worker thread per base model, batching across adapters); `app` is the
HTTP layer over it. The engine never sees HTTP; the app never touches a tensor.
"""
