"""The cluster layer: everything that differs between one machine and a Ray cluster lives here.

- :mod:`~alpaca_ray.cluster.storage`: the one storage root (a path every node mounts, or ``s3://`` /
  ``gs://``) and the file operations every stage writes its artifacts through.
- :mod:`~alpaca_ray.cluster.preflight`: proves, before anything is paid for or submitted, that every
  node sees the root and has the secrets its stage needs.
- :mod:`~alpaca_ray.cluster.ray_cluster`: which Ray cluster a process joins (``ensure_ray``).
- :mod:`~alpaca_ray.cluster.sqlite_store`: SQLite on the root with one writer (reports, human ratings).
- :mod:`~alpaca_ray.cluster.services`: long-running apps on the cluster: waiting for a stop signal, and
  the URL a Serve app answers at, reachable from every node.
"""
