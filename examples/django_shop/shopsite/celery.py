import os

from celery import Celery

import pcelery.worker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shopsite.settings")

app = Celery("shopsite")
# Every task of this app is now persistent: claim-checked, submitted through the outbox, run on SQS.
pcelery.worker.configure(app)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
