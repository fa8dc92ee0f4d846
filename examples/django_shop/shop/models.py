from django.db import models


class Order(models.Model):
    item = models.CharField(max_length=100)
    quantity = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    receipt_sent_at = models.DateTimeField(null=True)
    receipts_sent = models.PositiveIntegerField(default=0)  # how often the receipt went out: once, we hope
