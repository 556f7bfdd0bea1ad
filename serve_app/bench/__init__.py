"""Load generator and SLO analysis for any OpenAI-compatible endpoint.

Modules, one purpose each:

- `records`  : `RequestRecord` (one request's timings) and the results JSON on disk.
- `workload` : prompts (synthetic with exact lengths, a mix of classes, or a ShareGPT/JSONL
  dataset).
- `arrivals` : request arrival times (Poisson, gamma with a burstiness shape, or all at once).
- `client`   : one streaming request over HTTP/SSE -> one `RequestRecord`.
- `runner`   : the load loop (open loop at a rate, closed loop at a concurrency, or both).
- `stats`    : percentiles, run summary, SLO attainment, goodput.
- `sweep`    : runs at several request rates and the goodput search over them.
- `report`   : text tables for one run and for a sweep.
- `compare`  : side-by-side table of several systems with ratios to a baseline.
- `plots`    : latency CDFs and percentile / SLO attainment curves vs request rate (PNG).
- `cli`      : argument parsing and the configs built from it; `__main__` runs the commands.

Entry point: `python -m serve_app.bench {run,sweep,plot,compare} --help`.
"""
