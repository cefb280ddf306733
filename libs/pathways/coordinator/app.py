"""The coordinator's Celery app: a real Redis-protocol broker and result backend, late acks."""

from __future__ import annotations

import os

from celery import Celery

BROKER_ENV = "PATHWAYS_BROKER_URL"
# The broker's password when the URL holds none (Kubernetes: from a Secret).
PASSWORD_ENV = "PATHWAYS_BROKER_PASSWORD"
DEFAULT_QUEUE = "pathways"


def broker_url(explicit: str | None = None, env=os.environ) -> str:
    url = explicit or env.get(BROKER_ENV)
    if not url:
        raise ValueError(
            f"no broker: pass --broker URL or set {BROKER_ENV} (e.g. "
            f"redis://127.0.0.1:6379/0); `pathways up` starts an embedded one"
        )
    password = env.get(PASSWORD_ENV, "")
    scheme, sep, rest = url.partition("://")
    if password and sep and "@" not in rest.split("/", 1)[0]:
        from urllib.parse import quote

        url = f"{scheme}://:{quote(password, safe='')}@{rest}"
    return url


def make_app(url: str | None = None) -> Celery:
    url = broker_url(url)
    app = Celery(
        "pathways",
        broker=url,
        backend=url,
        include=[
            "pathways.coordinator.tasks",
            "pathways.coordinator.distill_tasks",
            "pathways.coordinator.diloco_tasks",
        ],
    )
    app.conf.update(
        task_default_queue=DEFAULT_QUEUE,
        # A job is acknowledged only when it ends; if the process running it dies, the message
        # goes back to the queue and the job resumes from its last checkpoint elsewhere.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_extended=True,
        result_expires=7 * 24 * 3600,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # Redelivery of a job whose whole worker vanished (not just its pool process).
        broker_transport_options={"visibility_timeout": 6 * 3600},
    )
    return app
