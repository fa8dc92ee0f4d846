"""The shop's periodic tasks: PCELERY_SCHEDULES=shop.schedules:SCHEDULES in the scheduler service
(`application.schedules` in cdk.json, which synth imports to check them). Keep this module free of
Django and Celery imports: synth loads it in the CDK app's virtualenv, not in the shop's."""

from pcelery.scheduler import Schedule

SCHEDULES = [
    Schedule(
        name="nightly-sales-report",
        task="shop.tasks.sales_report",
        cron="30 2 * * *",
        timezone="Europe/Paris",
        kwargs={"day": "yesterday"},
        missed="catch_up",
    ),
]
