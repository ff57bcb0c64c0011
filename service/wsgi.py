"""WSGI entry point: `gunicorn -c service/gunicorn.conf.py service.wsgi:app`.

Gunicorn's gevent worker monkey-patches the standard library in each worker before it
imports this module, so the sockets redis-py opens here are already cooperative.
Models load in an OS thread beside the requests (503 until they have): the worker
accepts as soon as gunicorn has bound the port.
"""

import logging

from service.app import create_app
from service.settings import Settings

settings = Settings.from_env()
logging.basicConfig(
    level=settings.server.log_level.upper(),
    format=f"%(asctime)s %(levelname)s [{settings.server.replica_id} pid %(process)d] %(name)s: %(message)s",
)
app = create_app(settings, load_in_background=True)
