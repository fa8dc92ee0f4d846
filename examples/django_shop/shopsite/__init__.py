# Django loads the Celery app with the project, so @shared_task binds to it.
from shopsite.celery import app as celery_app

__all__ = ("celery_app",)
