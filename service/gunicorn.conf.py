"""Gunicorn configuration of one api replica: `gunicorn -c service/gunicorn.conf.py service.wsgi:app`.

Every value comes from service.settings (environment variables, see docs/settings.md);
the comments say why each non-default value is what it is.
"""

import os
import shutil
from pathlib import Path

from service.settings import Settings

_settings = Settings.from_env()

# --- Server socket -------------------------------------------------------------------
bind = _settings.server.bind
# Pending connections while every worker is busy; a burst queues here, not in a 502.
backlog = 2048

# --- Workers ---------------------------------------------------------------------------
# gevent: many concurrent keep-alive connections per worker with cheap greenlets
# (needs the gunicorn[gevent] extra). The worker monkey-patches before loading the app.
# Our subclass closes idle keep-alive connections on SIGTERM, so a stop does not wait
# out graceful_timeout for nginx's pooled connections (see service/worker.py).
worker_class = "service.worker.GracefulGeventWorker"
# One process per core: predict is CPU-bound, more processes only add switching.
workers = _settings.server.workers
# Bounds greenlets (and so Redis connections: SERVICE_REDIS_MAX_CONNECTIONS defaults to
# it) per worker; must stay >= nginx's upstream `keepalive` so pooled connections fit.
worker_connections = _settings.server.worker_connections
# Longer than nginx's upstream keepalive_timeout (60 s): with gunicorn's default 2 s,
# nginx reuses connections gunicorn is closing and clients get 502s under load.
keepalive = _settings.server.keepalive_s
# In-flight requests get this long to finish on SIGTERM (compose/k8s stop grace >= it).
graceful_timeout = _settings.server.graceful_timeout_s
timeout = _settings.server.timeout_s
# Load the app in each worker, after the gevent monkey-patch, never in the master.
preload_app = False

# --- Control and logging -------------------------------------------------------------
# gunicorn >= 27 opens one control socket shared by every gunicorn on the host
# (~/.gunicorn/gunicorn.ctl); replicas would fight over it, and we do not use it.
control_socket_disable = True
# The balancer writes the access log (with upstream times); a second one costs CPU.
accesslog = None
errorlog = "-"
loglevel = _settings.server.log_level
proc_name = f"pcluster-api-{_settings.server.replica_id}"

# --- Metrics (Prometheus multiprocess mode) --------------------------------------------
# Workers write samples to files in this folder, /metrics merges them. It must be set
# before any worker imports prometheus_client, and wiped so a restart starts at zero.
_metrics_dir = str(_settings.server.metrics_path)


def on_starting(server):
    """Wipe and create the metrics folder, and point workers at it."""
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir


def child_exit(server, worker):
    """Mark a dead worker's live gauges as gone, and forget that it was ready."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _metrics_dir)
    # Its readiness mark (service.app._load_then_mark): a reused pid must not inherit it.
    Path(_metrics_dir, f"ready-{worker.pid}").unlink(missing_ok=True)
