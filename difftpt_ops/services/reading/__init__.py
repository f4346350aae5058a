"""Reading results: per-run summaries and exports (`results`), groups of runs over seeds, orders and
sweeps (`groups`), the paper table (`table` builds it, `table_render` prints and logs it), statistics
(`stats`), read-only SQL (`sql`), disk and feature-store usage (`disk`, `store`), and MLflow reports of
runs (`reporting`).

Nothing here imports `services.running`: reading depends only on what running wrote to the database.
"""
