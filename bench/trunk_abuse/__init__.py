"""``bench.trunk_abuse``: the SFPrompt trunk's memory under abuse, SmolLM2-135M.

One process serves the real trunk (``models.split.Trunk`` of SmolLM2-135M,
float32, CPU) with :class:`server.trunk_service.TrunkService` on 127.0.0.1
and attacks it over real gRPC, one scenario after another
(:mod:`bench.trunk_abuse.scenarios`):

``opens``
    256 Opens without a grant, then a granted device opens and trains.
``pending``
    four granted nodes each send a maximal frame (64 MB) and then the
    largest frame their share admits, and never call Backward; the pending
    deadline then frees the graphs (injected clock).
``keepalive``
    a session that only receives refused calls, one every few (fake)
    seconds, must still expire at the idle deadline.
``names``
    five Opens with 40 MB node labels.
``stalled``
    one connection holding 8 HTTP/2 streams whose request never completes,
    while a device trains.

Each scenario records the process's resident memory (sampled every 10 ms)
above the baseline taken after the model and service were ready, the
budget's reserved bytes, and what the device saw; it passes when the
resident growth stays within the configured memory budget plus the bytes of
the requests in flight. ``__main__`` writes ``results/trunk_abuse.json`` and
``.md``; ``--render`` rewrites the markdown from the JSON.
"""
