"""Signals other apps listen to, sent after the transaction that caused them commits."""

from django.dispatch import Signal

# sent with version_id when a version has passed validation
version_ready = Signal()
