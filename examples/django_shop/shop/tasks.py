from datetime import timedelta

from celery import shared_task
from django.db.models import F
from django.utils import timezone

from shop.models import Order


@shared_task
def send_receipt(order_id: int) -> dict:
    # Stands in for an e-mail: counts how often it went out.
    Order.objects.filter(id=order_id).update(receipt_sent_at=timezone.now(), receipts_sent=F("receipts_sent") + 1)
    return {"order": order_id}


@shared_task(queue="long", time_limit=1800)
def sales_report(day: str) -> dict:
    """`day`: an ISO date, or "yesterday" (the nightly schedule's, shop/schedules.py)."""
    if day == "yesterday":
        day = (timezone.localdate() - timedelta(days=1)).isoformat()
    orders = Order.objects.filter(created_at__date=day)
    return {"day": day, "orders": orders.count()}
