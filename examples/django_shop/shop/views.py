import json

from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from shop.models import Order
from shop.tasks import send_receipt


@csrf_exempt
@require_POST
def place_order(request: HttpRequest) -> JsonResponse:
    body = json.loads(request.body or b"{}")
    with transaction.atomic():
        order = Order.objects.create(item=body["item"], quantity=int(body.get("quantity", 1)))
        result = send_receipt.delay(order.id)
        if order.quantity > 100:  # a rule checked after the writes: the whole order rolls back
            transaction.set_rollback(True)
            return JsonResponse({"error": "at most 100 of an item"}, status=400)
    return JsonResponse({"order": order.id, "receipt_task": result.id}, status=201)
