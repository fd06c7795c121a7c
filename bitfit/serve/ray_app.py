"""`bitfit serve` on Ray Serve: the same app in every replica, with Ray's replicas, autoscaling and routing.

Each replica is a Ray actor holding one TaskSession with every pack of the packs directory, and serves
the whole HTTP app of bitfit.serve.app (/v1 and the /v2 Open Inference Protocol, its doors and limits) behind
Ray's HTTP proxy; within a replica the existing batcher gathers rows of all tasks into one `run_mixed`
call. Nothing here is cluster logic: replicas, restarts, autoscaling and placement are Ray's
(`num_replicas`, `autoscaling_config`, `ray_actor_options` in a Serve config), and a reload reaches every
replica through Ray's own `DeploymentHandle.broadcast`:

- POST /v1/admin/reload (routed to any one replica) rescans the packs directory on every live replica and
  answers `{"replicas": [{"replica", "added", "replaced", ..., "digests": {task: digest}}, ...]}`.
- A replica that starts later (a restart, a scale-up) reads the directory as it is then; with
  `reload_every_s` every replica also rescans on its own, so one that missed a broadcast catches up.
- GET /v1/tasks names the replica that answered and the digest of every pack it serves; /v2 responses carry
  the digest as the model version: a client can always tell which version of a task answered.

Start it with `bitfit serve --ray ...`, or with Ray's own CLI and a config file:

    serve run bitfit.serve.ray_app:build compiled=compiled packs=packs replicas=2

On a multi-node cluster the compiled directory and the packs directory must be readable at the same path on
every node (shared storage: NFS, a mounted bucket); see docs/serving.md. Needs `pip install 'bitfit-deploy[ray]'`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ray import serve

from bitfit.runtime.errors import BitFitError

DEPLOYMENT = "bitfit"


@serve.deployment(name=DEPLOYMENT)
@serve.ingress()
class BitFitReplica:
    """One replica: a TaskSession over every pack in `packs`, served by bitfit.serve.app's app."""

    def __init__(self, compiled: str, packs: str, threads: int = 1, backend: str = "onnxruntime",
                 limits: dict[str, Any] | None = None) -> None:
        self.compiled, self.packs, self.threads, self.backend = compiled, packs, threads, backend
        self.limits = dict(limits or {})
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.app_name = context.replica_id.deployment_id.app_name
        self.started = time.time()

    def __serve_build_asgi_app__(self):
        from bitfit.runtime.session import TaskSession

        from .app import ServeConfig, create_app

        session = TaskSession(self.compiled, threads=self.threads, spinning=False, backend=self.backend)
        self.server = create_app(session, self.packs, ServeConfig.from_limits(**self.limits), replica=self.replica,
                              reload_all=self.reload_everywhere)
        if not len(session):
            raise BitFitError(f"no valid task pack in {self.packs}: nothing to serve")
        return self.server

    async def reload_here(self) -> dict[str, Any]:
        """Rescan the packs directory in this replica (what a broadcast calls on each)."""
        result = await self.server.state.reload()
        session = self.server.state.session
        return {"replica": self.replica, **result.to_json(),
                "digests": {t: session.digest(t) for t in session.tasks}}

    async def reload_everywhere(self, patience_s: float = 60.0) -> dict[str, Any]:
        """Rescan on every running replica. A broadcast reaches the replicas its handle knows of, and a handle
        made in a replica learns of a replica that just started (a restart, a scale-up) a moment later:
        measured here, the first broadcast after a replica was replaced reached only the one that sent it.
        So broadcast again (a rescan is idempotent) until as many replicas answered as Ray reports RUNNING,
        or `patience_s` passed; the answer says how many were expected."""
        import asyncio

        handle = serve.get_deployment_handle(DEPLOYMENT, self.app_name)
        answered: dict[str, dict[str, Any]] = {}
        errors: list[str] = []
        deadline = time.monotonic() + patience_s
        while True:
            answers = await handle.broadcast("reload_here").results_async(timeout_s=300, return_exceptions=True)
            for a in answers:
                if isinstance(a, dict):
                    answered[a["replica"]] = a
                else:
                    errors.append(f"{type(a).__name__}: {a}"[:300])
            running = await asyncio.to_thread(self._running_replicas)
            if len(answered) >= running or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        return {"replicas": [answered[k] for k in sorted(answered)], "running": running,
                **({"errors": errors[-5:]} if len(answered) < running else {})}

    def _running_replicas(self) -> int:
        status = serve.status().applications[self.app_name].deployments[DEPLOYMENT]
        return int(status.replica_states.get("RUNNING", 0))

    async def describe(self) -> dict[str, Any]:
        """Which replica this is and the digest of every pack it serves (for tests and operators)."""
        session = self.server.state.session
        return {"replica": self.replica, "pid": os.getpid(), "started": self.started,
                "digests": {t: session.digest(t) for t in session.tasks}}


def deployment(compiled: str | os.PathLike, packs: str | os.PathLike, *, replicas: int | str = 1,
               replica_cpus: float = 1.0, threads: int = 1, backend: str = "onnxruntime",
               **limits: Any) -> serve.Application:
    """The Ray Serve application: `replicas` copies (or "auto": Ray's autoscaling) of BitFitReplica, each
    given `replica_cpus` of Ray's CPUs and `threads` onnxruntime threads. `limits` are ServeConfig fields."""
    from .app import ServeConfig

    if limits.get("admin_token") is None:
        limits["admin_token"] = os.environ.get("BITFIT_ADMIN_TOKEN") or None
    if limits["admin_token"] is None and not limits.get("allowed_hosts"):
        raise BitFitError("Ray's proxy may listen beyond loopback, which would open POST /v1/admin/reload to the "
                          "network: give admin_token (or BITFIT_ADMIN_TOKEN), as `bitfit serve --ray` does")
    ServeConfig.from_limits(**limits)  # refuse bad limits here, not in every replica
    for path, what in ((compiled, "compiled directory"), (packs, "packs directory")):
        if not Path(path).is_dir():
            raise BitFitError(f"no {what} at {path}: every node of the cluster must see it at this path")
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": replica_cpus}}
    options["num_replicas"] = replicas
    return BitFitReplica.options(**options).bind(str(Path(compiled).resolve()), str(Path(packs).resolve()),
                                                  threads, backend, limits)


def build(args: dict[str, str]) -> serve.Application:
    """For `serve run bitfit.serve.ray_app:build compiled=DIR packs=DIR [replicas=N] [threads=N]
    [reload_every_s=S] [admin_token=T]` and Serve config files (`import_path` + `args`)."""
    args = dict(args)
    try:
        compiled, packs = args.pop("compiled"), args.pop("packs")
    except KeyError as e:
        raise BitFitError(f"give {e.args[0]}=DIR to the application builder") from None
    replicas = args.pop("replicas", "1")
    kwargs: dict[str, Any] = {"replicas": replicas if replicas == "auto" else int(replicas)}
    for key, cast in (("replica_cpus", float), ("threads", int), ("reload_every_s", float), ("max_texts", int),
                      ("max_batch_rows", int), ("max_wait_ms", float)):
        if key in args:
            kwargs[key] = cast(args.pop(key))
    for key in ("backend", "admin_token"):
        if key in args:
            kwargs[key] = args.pop(key)
    if args:
        raise BitFitError(f"unknown arguments {sorted(args)} for bitfit.serve.ray_app:build")
    return deployment(compiled, packs, **kwargs)


def patient_proxy(seconds: float = 60.0) -> None:
    """Give Ray's HTTP proxy `seconds` to come up (unless set already): Ray allows 5 s, then kills and restarts
    it, and on a busy 2-core machine that loop was seen to fail a deployment. Read when Ray starts its
    processes on this machine, so call it before ray.init."""
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(seconds))


def run(compiled: str | os.PathLike, packs: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000,
        address: str | None = None, replicas: int | str = 2, blocking: bool = True, **kwargs: Any):
    """Start (or join, with `address`) a Ray cluster, deploy the app on `host:port`, and block until
    interrupted (`bitfit serve --ray`). Returns the ingress handle when not blocking."""
    import ray

    from .app import door_limits

    kwargs = door_limits(host, kwargs)
    patient_proxy()
    if not ray.is_initialized():  # "local": a new cluster on this machine, never one left running by another
        ray.init(address=address or "local", include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    serve.start(http_options={"host": host, "port": int(port)})
    handle = serve.run(deployment(compiled, packs, replicas=replicas, **kwargs), name="bitfit", route_prefix="/",
                       blocking=False)
    if not blocking:
        return handle
    print(f"bitfit serve --ray: {replicas} replicas on http://{host}:{port} (Ray dashboard and `serve status` "
          "show them); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return None
