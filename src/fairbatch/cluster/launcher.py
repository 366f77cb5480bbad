"""Multi-replica launch: one ``fairbatch serve`` process per GPU (or CPU replicas), placed
by Ray (a local Ray instance, or an existing cluster given by address) or started as
plain local processes, with the router in front (``fairbatch cluster``).

Each replica is a ``fairbatch serve`` subprocess on a free port. Under Ray it is started
by a small actor that holds its GPU (``num_gpus=1``: Ray sets ``CUDA_VISIBLE_DEVICES``,
the subprocess inherits it) or its CPUs; the actor reports the replica's URL once its
``/health`` answers, and stops it on request. A replica process watches its parent (the
actor, or the launcher): if that dies, the replica stops too, so no server outlives its
cluster, however the cluster ends.

Ray is imported only when used: ``pip install ray`` for ``--launcher ray``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

_REPLICA_MAIN = "from fairbatch.cluster.launcher import replica_main; replica_main()"


class LaunchError(RuntimeError):
    """A replica could not be started (its log's tail is in the message)."""


# --- inside a replica process ------------------------------------------------------------------
def replica_main() -> None:
    """``python -c ... PARENT_PID serve ARGS...``: run ``fairbatch serve`` and stop it
    (SIGTERM, then a hard exit) once the parent process is gone."""
    parent = int(sys.argv[1])
    args = sys.argv[2:]

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(15.0)
                os._exit(1)

    threading.Thread(target=watch, name="fairbatch-parent-watch", daemon=True).start()
    sys.argv = ["fairbatch", *args]
    from fairbatch.cli import main

    main()


# --- one replica process -----------------------------------------------------------------------
def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


class ReplicaProcess:
    """``fairbatch serve SERVE_ARGS --host HOST --port <free>`` as a subprocess, its output
    in a log file; ``start`` returns once ``/health`` answers 200."""

    def __init__(self, serve_args: Sequence[str], *, host: str = "127.0.0.1", advertise_host: str | None = None,
                 env: dict[str, str] | None = None, log_dir: str | None = None, name: str = "replica") -> None:
        self.serve_args = list(serve_args)
        self.host = host
        self.advertise_host = advertise_host or (host if host not in ("0.0.0.0", "::") else socket.gethostname())
        self.env = env
        self.name = name
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="fairbatch-replica-"))
        self.log_path = self.log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        assert self.port is not None
        return _url(self.advertise_host, self.port)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 300.0) -> str:
        """Start it and wait until it serves; returns its URL. Raises LaunchError."""
        for attempt in range(3):
            self.port = free_port(self.host)
            cmd = [sys.executable, "-c", _REPLICA_MAIN, str(os.getpid()), "serve", *self.serve_args,
                   "--host", self.host, "--port", str(self.port)]
            env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=env, start_new_session=True)
            try:
                self._wait_ready(timeout)
                return self.url
            except LaunchError as e:
                if "cannot listen" in str(e) and attempt < 2:
                    continue          # lost the free port to someone else: another one
                raise
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        url = _url(self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1", self.port or 0) + "/health"
        with httpx.Client(timeout=2.0) as c:
            while True:
                rc = self.proc.poll()
                if rc is not None:
                    raise LaunchError(f"{self.name} exited with status {rc} during start-up:\n{_tail(self.log_path)}")
                try:
                    if c.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise LaunchError(f"{self.name} did not serve within {timeout:g} s:\n{_tail(self.log_path)}")
                time.sleep(0.1)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (a graceful uvicorn shutdown), then SIGKILL after ``timeout``."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass
        return p.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 15) -> str:
        return _tail(self.log_path, n)


# --- the Ray actor ----------------------------------------------------------------------------------
class ReplicaActor:
    """Runs one ReplicaProcess on the node and in the resources Ray gave the actor."""

    def __init__(self, serve_args: list[str], host: str, name: str, log_dir: str | None = None) -> None:
        import ray

        advertise = None
        if host in ("0.0.0.0", "::"):
            advertise = ray.util.get_node_ip_address()
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
        self.replica = ReplicaProcess(serve_args, host=host, advertise_host=advertise, name=name, log_dir=log_dir)
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]

    def start(self, timeout: float) -> dict[str, Any]:
        try:
            url = self.replica.start(timeout)
        except LaunchError as e:
            return {"error": str(e)}
        return {"url": url, "pid": self.replica.pid, "node": socket.gethostname(), "gpus": self.gpu_ids,
                "log": str(self.replica.log_path), "actor_pid": os.getpid()}

    def alive(self) -> bool:
        return self.replica.alive()

    def stop(self, timeout: float = 15.0) -> int | None:
        return self.replica.stop(timeout)

    def log_tail(self, n: int = 15) -> str:
        return self.replica.log_tail(n)


# --- the cluster -------------------------------------------------------------------------------------
@dataclass
class ClusterSpec:
    replicas: int | None = None          # None: one per GPU (at least one)
    serve_args: list[str] = field(default_factory=list)
    launcher: str = "ray"                # ray | local
    address: str | None = None           # Ray cluster address; None: start a local Ray instance
    device: str = "auto"                 # auto | cuda | cpu
    cpus_per_replica: float = 1.0
    # Where replicas listen: 127.0.0.1 unless told otherwise, so that no replica is open to
    # the network by default (with --address, replicas on other nodes need an address the
    # router reaches: the caller must say which).
    replica_host: str | None = None
    start_timeout: float = 600.0
    log_dir: str | None = None           # replica logs (on each node); default: a new temporary folder
    env: dict[str, str] = field(default_factory=dict)   # extra environment of every replica (the API key)


@dataclass
class ReplicaInfo:
    url: str
    pid: int | None
    node: str
    gpus: list[str]
    log: str

    def meta(self) -> dict[str, Any]:
        return {"pid": self.pid, "node": self.node, "gpus": self.gpus, "log": self.log}


def _local_gpu_count() -> int:
    """GPUs on this machine, without importing torch: CUDA_VISIBLE_DEVICES, else nvidia-smi."""
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([d for d in vis.split(",") if d.strip() and d.strip() != "-1"])
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _device_args(serve_args: list[str], gpu: bool) -> list[str]:
    if gpu or any(a == "--device" or a.startswith("--device=") for a in serve_args):
        return serve_args
    return [*serve_args, "--device", "cpu"]


class Cluster:
    """Started replicas (``launch``), stopped together (``shutdown``); a context manager."""

    def __init__(self, spec: ClusterSpec, *, on_event: Callable[[str], None] | None = None) -> None:
        if spec.launcher not in ("ray", "local"):
            raise ValueError(f"unknown launcher {spec.launcher!r}: ray or local")
        if spec.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"unknown device {spec.device!r}: auto, cuda or cpu")
        if spec.replicas is not None and spec.replicas < 1:
            raise ValueError("--replicas must be >= 1")
        if spec.cpus_per_replica <= 0:
            raise ValueError("--cpus-per-replica must be positive")
        if spec.launcher == "ray" and spec.address is not None and spec.replica_host is None:
            raise ValueError("with --address, replicas may run on other nodes: give --replica-host (e.g. 0.0.0.0, "
                             "with an --api-key, or an interface the router reaches); they bind 127.0.0.1 otherwise")
        self.spec = spec
        self.say = on_event or (lambda msg: None)
        self.replicas: list[ReplicaInfo] = []
        self.gpu = False
        self._procs: list[ReplicaProcess] = []
        self._actors: list[Any] = []
        self._ray_started = False
        self._ray: Any = None

    # --- launch ------------------------------------------------------------------------------
    def launch(self) -> list[ReplicaInfo]:
        try:
            if self.spec.launcher == "ray":
                self._launch_ray()
            else:
                self._launch_local()
        except BaseException:
            self.shutdown()
            raise
        return self.replicas

    def _plan(self, gpus: int) -> tuple[int, bool]:
        spec = self.spec
        if spec.device == "cuda" and gpus == 0:
            raise LaunchError("--device cuda, but no GPU was found" + (" in the Ray cluster" if spec.launcher == "ray" else ""))
        gpu = gpus > 0 and spec.device != "cpu"
        n = spec.replicas if spec.replicas is not None else (gpus if gpu else 1)
        if gpu and n > gpus:
            raise LaunchError(f"{n} GPU replicas asked for, but only {gpus} GPU(s) "
                              + ("in the Ray cluster" if spec.launcher == "ray" else "on this machine")
                              + ": lower --replicas, or --device cpu")
        return n, gpu

    def _launch_local(self) -> None:
        spec = self.spec
        n, gpu = self._plan(_local_gpu_count() if spec.device != "cpu" else 0)
        self.gpu = gpu
        host = spec.replica_host or "127.0.0.1"
        args = _device_args(spec.serve_args, gpu)
        log_dir = spec.log_dir or tempfile.mkdtemp(prefix="fairbatch-cluster-")
        os.makedirs(log_dir, exist_ok=True)
        visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        for i in range(n):
            env = dict(spec.env)
            if gpu:
                env["CUDA_VISIBLE_DEVICES"] = visible[i] if i < len(visible) else str(i)
            self._procs.append(ReplicaProcess(args, host=host, env=env, log_dir=log_dir, name=f"replica-{i}"))
        self.say(f"starting {n} {'GPU' if gpu else 'CPU'} replica(s) as local processes (logs in {log_dir})")
        errors: list[str | None] = [None] * n

        def start(i: int) -> None:
            try:
                self._procs[i].start(spec.start_timeout)
            except LaunchError as e:
                errors[i] = str(e)

        threads = [threading.Thread(target=start, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [e for e in errors if e]
        if failed:
            raise LaunchError(failed[0])
        for i, p in enumerate(self._procs):
            self.replicas.append(ReplicaInfo(p.url, p.pid, socket.gethostname(),
                                             [p.env["CUDA_VISIBLE_DEVICES"]] if p.env and gpu else [], str(p.log_path)))

    def _launch_ray(self) -> None:
        try:
            import ray
        except ImportError:
            raise LaunchError("--launcher ray needs Ray: pip install ray (or use --launcher local)") from None
        import logging

        spec = self.spec
        self._ray = ray
        if not ray.is_initialized():
            if spec.address is None:
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                local_host = spec.replica_host or "127.0.0.1"
                gpus = _local_gpu_count() if spec.device != "cpu" else 0
                want = spec.replicas or max(1, gpus)
                cpus = max(os.cpu_count() or 1, int(want * spec.cpus_per_replica + 0.999))
                self.say(f"starting a local Ray instance ({cpus} CPUs, {gpus} GPUs)")
                # address="local": a new instance of our own, even where another one runs
                kw: dict[str, Any] = dict(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
                                          log_to_driver=False,
                                          logging_level=logging.WARNING, object_store_memory=100 * 1024 * 1024)
                if local_host in ("127.0.0.1", "localhost"):
                    kw["_node_ip_address"] = "127.0.0.1"
                ray.init(**kw)
            else:
                self.say(f"connecting to the Ray cluster at {spec.address}")
                ray.init(address=spec.address, log_to_driver=False, logging_level=logging.WARNING)
            self._ray_started = True
        res = ray.cluster_resources()
        n, gpu = self._plan(int(res.get("GPU", 0)) if spec.device != "cpu" else 0)
        self.gpu = gpu
        host = spec.replica_host or "127.0.0.1"
        args = _device_args(spec.serve_args, gpu)
        opts: dict[str, Any] = {"num_cpus": spec.cpus_per_replica, "max_restarts": 0}
        if spec.env:
            opts["runtime_env"] = {"env_vars": dict(spec.env)}
        if gpu:
            opts["num_gpus"] = 1
        actor_cls = ray.remote(**opts)(ReplicaActor)
        self.say(f"placing {n} {'GPU' if gpu else 'CPU'} replica(s) with Ray")
        self._actors = [actor_cls.remote(args, host, f"replica-{i}", spec.log_dir) for i in range(n)]
        refs = [a.start.remote(spec.start_timeout) for a in self._actors]
        try:
            results = ray.get(refs, timeout=spec.start_timeout + 30)
        except ray.exceptions.GetTimeoutError:
            raise LaunchError(f"the {n} replica(s) were not all placed and serving within {spec.start_timeout:g} s "
                              f"(cluster resources: {res})") from None
        except ray.exceptions.RayError as e:
            raise LaunchError(f"a replica actor failed: {e}") from None
        for r in results:
            if "error" in r:
                raise LaunchError(r["error"])
        self.replicas = [ReplicaInfo(r["url"], r["pid"], r["node"], r["gpus"], r["log"]) for r in results]

    # --- shutdown ------------------------------------------------------------------------------
    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop every replica (SIGTERM, then SIGKILL), then the Ray instance this started."""
        for p in self._procs:
            try:
                p.stop(timeout)
            except Exception:   # noqa: BLE001
                p.kill()
        self._procs = []
        ray = self._ray
        if self._actors and ray is not None:
            try:
                ray.get([a.stop.remote(timeout) for a in self._actors], timeout=timeout + 10)
            except Exception:   # noqa: BLE001 - dead actors: their replicas follow them (parent watch)
                pass
            for a in self._actors:
                try:
                    ray.kill(a)
                except Exception:   # noqa: BLE001
                    pass
        self._actors = []
        if self._ray_started and ray is not None:
            try:
                ray.shutdown()
            except Exception:   # noqa: BLE001
                pass
            self._ray_started = False

    def __enter__(self) -> "Cluster":
        self.launch()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
