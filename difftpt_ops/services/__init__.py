"""Use cases: register datasets, plan/submit/resume runs, execute shards, summarise results."""
