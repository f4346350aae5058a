"""Running work: from `submit` to the rows a sample leaves behind.

One path, whoever runs the shards (a Celery worker, or the embedded loop of `submit`/`resume`):

- `runs` plans a run (or attaches to the same one) and splits it into shards; `resume`, `cancel`.
- `dispatch` queues a run's open shards and sends them to the broker; the workers' periodic check
  re-queues shards whose worker went silent and messages the broker lost. `embedded` runs them in
  this process instead when there is no broker.
- `leases` says who holds a shard: a worker's identity and liveness, claims, heartbeats, giving back.
- `shards` executes one shard of an episodic run (claim, skip finished samples, process the rest,
  write batches); `online` one link of an online run's ordered chain, with its checkpoints.
  Both return an `outcomes.ShardOutcome`.
- `contexts` builds a run's processor once per process: `processors` (tuning), `generation`
  (Stable Diffusion variations and the generated views DiffTPT reads), `features` (the per-view
  feature store). `waiting` parks shards whose generated images are not there yet.
- `finalize` moves a run whose shards are all terminal to its final state, in one place.
- `status` reads what runs are doing; `sweeps` and `estimate` plan many runs, or none.

Imports point down: `runs` -> `dispatch`/`embedded` -> `shards`/`online` -> `contexts` -> the
processors -> `leases`/`outcomes`/`finalize` -> `services.reading` (MLflow reports) -> the library.
"""
