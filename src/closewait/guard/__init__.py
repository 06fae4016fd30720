"""Prevention: the remedies as reusable pieces (timing-wheel idle reaper, guarded asyncio server, tracing, sentinel)."""
