"""Serving on a Ray cluster: one actor per device worker, the HTTP front end in front.

``worker.EngineWorker`` is the actor: it owns one device, loads its models, runs their
``Engine`` (KV pool and local scheduler) and streams each request's deltas back.
``remote.RemoteEngine`` is the front end's stand-in for it, with the interface the server
uses for a local ``Engine``, so ``server.build_app`` serves local and remote engines alike.
``launch`` builds the actors from a placement file whose groups name nodes, and
``supervisor.Supervisor`` places a dead worker's models again on the remaining workers.

Ray is an optional extra (``pip install -e ".[ray]"``): nothing here imports it until a
cluster is used, and nothing outside this package imports this package.
"""

from fineserve_jax.raycluster.remote import RemoteEngine, WorkerLost

__all__ = ["RemoteEngine", "WorkerLost"]
