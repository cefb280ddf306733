"""Coordinator worker entry point: a Celery worker that runs Pathways training jobs."""

from pathways.coordinator.worker import main

if __name__ == "__main__":
    main()
