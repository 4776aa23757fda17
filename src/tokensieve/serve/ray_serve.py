"""The OpenAI-compatible server as Ray Serve replicas behind one endpoint (``tokensieve serve --ray-replicas N``).

Each replica is a Ray actor that loads the model once, runs its own :class:`~tokensieve.serve.engine.Engine`
(continuous batching, KV admission) and serves the same FastAPI app as ``tokensieve serve``; Ray Serve's HTTP proxy
spreads requests over the replicas. What a replica holds stays in that replica: stored contexts
(``/v1/contexts``) and the KV memory budget are per replica, so a client reusing a context must reach the replica
that stored it (or use a single replica). Every response carries the header ``x-tokensieve-replica``.

Ray is imported only here, lazily; without it a :class:`~tokensieve.errors.ConfigError` names the ``ray`` extra.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ConfigError

DEPLOYMENT = "tokensieve"


@dataclass(frozen=True)
class ReplicaSettings:
    """What every replica builds its engine from (``model`` must be loadable on every node)."""

    model: str
    spec: str = "full"
    kv_memory: int | None = None
    max_batch: int = 16
    max_tokens: int = 256
    max_prompt_tokens: int | None = None
    served_model_name: str | None = None
    threads: int = 1
    limits: dict[str, Any] = field(default_factory=dict)  # Limits fields; None or absent: the default
    api_key: str | None = None
    allowed_hosts: list[str] | None = None
    allowed_methods: list[str] | None = None
    step_tokens: int | None = 256  # the scheduler (Engine's arguments of the same names)
    prefix_cache: bool = True
    prefix_block: int = 32
    prefix_memory: int | None = None
    compress_min_tokens: int = 0


class Replica:
    """One Ray Serve replica: a model, an engine and the FastAPI app (built by ``__serve_build_asgi_app__``)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from ..adapters.models import load_model
        from ..results.threads import use_threads
        from .engine import Engine
        from .limits import Limits

        s = ReplicaSettings(**settings)
        self.settings = s
        use_threads(s.threads)
        model, tok = load_model(s.model)
        self.engine = Engine(
            model,
            tok,
            spec=s.spec,
            kv_memory=s.kv_memory,
            max_batch=s.max_batch,
            model_name=s.served_model_name or s.model,
            max_prompt_tokens=s.max_prompt_tokens,
            max_tokens=s.max_tokens,
            limits=Limits.from_mapping(s.limits),
            allowed_methods=None if s.allowed_methods is None else set(s.allowed_methods),
            step_tokens=s.step_tokens,
            prefix_cache=s.prefix_cache,
            prefix_block=s.prefix_block,
            prefix_memory=s.prefix_memory,
            compress_min_tokens=s.compress_min_tokens,
        ).start()
        try:
            from ray import serve

            self.replica_id = str(serve.get_replica_context().replica_id.unique_id)
        except Exception:  # outside a Serve replica (e.g. built directly)
            self.replica_id = "local"

    def __serve_build_asgi_app__(self) -> Any:
        from .app import create_app

        s = self.settings
        app = create_app(self.engine, start=False, api_key=s.api_key, allowed_hosts=s.allowed_hosts)
        replica_id = self.replica_id

        @app.middleware("http")
        async def _tag(request: Any, call_next: Any) -> Any:
            response = await call_next(request)
            response.headers["x-tokensieve-replica"] = replica_id
            return response

        return app

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def import_serve() -> Any:
    """``ray.serve``, or a one-line ConfigError naming the extra."""
    try:
        from ray import serve
    except ImportError as exc:
        raise ConfigError("Ray Serve replicas need Ray, which is not installed: pip install 'tokensieve[ray]'") from exc
    return serve


def application(settings: ReplicaSettings, replicas: int) -> Any:
    """The Ray Serve application: ``replicas`` copies of :class:`Replica`, each reserving ``settings.threads`` CPUs."""
    serve = import_serve()
    if replicas < 1:
        raise ConfigError(f"--ray-replicas must be >= 1; got {replicas}.")
    cls = serve.ingress()(Replica)
    dep = serve.deployment(
        cls,
        name=DEPLOYMENT,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": settings.threads},
        max_ongoing_requests=max(settings.max_batch * 2, 8),
    )
    return dep.bind(asdict(settings))


def run(
    settings: ReplicaSettings,
    replicas: int,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    blocking: bool = True,
) -> Any:
    """Connect to (or start) Ray, start Serve's HTTP proxy on ``host:port`` and deploy the replicas; the endpoint is
    ``http://host:port/v1``. ``blocking``: serve until interrupted. Returns the deployment handle."""
    import ray

    serve = import_serve()
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"Could not connect to Ray at {address or 'a local cluster'}: {exc}") from exc
    serve.start(http_options={"host": host, "port": port})
    handle = serve.run(application(settings, replicas), name=DEPLOYMENT, route_prefix="/")
    print(f"tokensieve serve (Ray Serve, {replicas} replicas): {settings.served_model_name or settings.model} · "
          f"spec {settings.spec} · http://{host}:{port}/v1", file=sys.stderr)  # fmt: skip
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return handle
