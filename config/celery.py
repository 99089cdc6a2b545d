import logging
import os
import threading
import time
import uuid
from typing import Any

from celery import Celery
from celery.signals import beat_init, celeryd_after_setup, worker_shutdown
from kombu.transport import redis as kombu_redis

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# A worker must outlive a restart of Redis (the stack restarts it within a second or two). With kombu 5.7
# and celery 5.7 it did not: when Redis went away while the worker held an unacknowledged message (acks_late),
# the worker died with AttributeError: 'NoneType' object has no attribute 'hostname'. Why:
#  1. kombu's Redis Channel.close() first reads the reply of the BRPOP in flight (kombu PR #1733, so that
#     a message Redis popped is not lost). On a dead socket that read raises ConnectionError, and close()
#     stops there: nothing is closed and the unacknowledged messages are not restored.
#  2. celery's consumer, on losing the broker, calls Connection.collect(), which ignores that error and
#     detaches the transport from the connection (transport.client = None), then Connection.close()
#     (celery PR #10242). That closes the half-closed channel again; its restore of the unacknowledged
#     messages now builds a Redis pool from transport.client, which is None: AttributeError, which is not
#     a connection error, so it escapes celery's handling and the worker exits (the same symptom as
#     kombu issues #582 and #970). Neither the settings nor the transport options avoid it.
# The fix: when that first read fails on the dead socket (it has cleared _in_poll), close() closes the rest
# of the channel at once, while the transport is still attached, as kombu means it to. The restore then
# fails as a connection error (Redis is down), which the callers ignore, and the messages stay in Redis's
# `unacked` hash: a task still running acks its message through the same channel once Redis is back, and a
# message left unacked is restored after the visibility timeout as usual (acks_late guarantees kept).
# Harmless once kombu closes such a channel by itself: the first close() then does not raise.
# tests/test_broker_loss.py kills a worker's Redis and checks it carries on.
_kombu_redis_channel_close = kombu_redis.Channel.close


def _redis_channel_close(self: kombu_redis.Channel) -> None:
    try:
        _kombu_redis_channel_close(self)
    except self.connection_errors:
        if self.closed:  # failed later on (restoring): kombu's own outcome, the callers ignore it
            raise
        _kombu_redis_channel_close(self)  # the BRPOP read failed before anything was closed: close now


kombu_redis.Channel.close = _redis_channel_close  # type: ignore[method-assign]

app = Celery("platform")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

log = logging.getLogger("config.celery")

# One beat at a time, however many are started: two would send every periodic task twice. A beat
# ticks only while it holds this key in the broker's Redis, refreshed every few seconds; when its
# holder dies the key expires and a waiting beat takes over.
BEAT_LOCK_KEY = "platform:beat-lock"
BEAT_LOCK_TTL_S = 10
# Extend the key if it is ours, take it again if it vanished (a Redis restarted without it), else 0.
_BEAT_LOCK_KEEP = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if not holder then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""


def beat_lock_hold(url: str, token: str, on_lost: Any) -> None:
    """Wait until this beat holds the lock, then keep it in a background thread; `on_lost` runs if
    another beat ever holds it instead."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    waiting_said = False
    while True:
        try:
            if client.set(BEAT_LOCK_KEY, token, nx=True, px=BEAT_LOCK_TTL_S * 1000):
                break
            if not waiting_said:
                log.warning("another beat is running; this one waits until it stops")
                waiting_said = True
        except redis.RedisError as exc:
            log.warning("beat lock: broker unavailable (%s); waiting", exc)
        time.sleep(1)
    log.info("beat lock held: this beat sends the periodic tasks")

    def keep() -> None:
        while True:
            time.sleep(BEAT_LOCK_TTL_S / 4)
            try:
                kept = client.eval(_BEAT_LOCK_KEEP, 1, BEAT_LOCK_KEY, token, str(BEAT_LOCK_TTL_S * 1000))
            except redis.RedisError:
                continue  # the broker is away: no beat can send anything meanwhile
            if not kept:
                on_lost()
                return

    threading.Thread(target=keep, name="beat-lock", daemon=True).start()


def _lost_beat_lock() -> None:
    log.error("another beat holds the beat lock now; exiting so that one beat runs (the supervisor restarts "
              "this one, which then waits)")
    os._exit(3)


@beat_init.connect
def _one_beat_only(sender: Any = None, **kwargs: Any) -> None:
    beat_lock_hold(app.conf.broker_url, uuid.uuid4().hex, _lost_beat_lock)


# Hardware targets (pipelines/hardware.py): a worker given the pseudo-queue `hil` (`--queues default,hil`)
# consumes instead the queue of each hardware profile its machine matches, and announces itself with its
# facts in Redis until it stops. Connected here because the queues must change before the consumer starts,
# which this signal of the worker's main process allows; the work itself is the pipelines app's.
_hil_heartbeat: Any = None


@celeryd_after_setup.connect
def _hil_queues(sender: str, instance: Any, **kwargs: Any) -> None:
    global _hil_heartbeat
    from pipelines import hardware

    queues = instance.app.amqp.queues
    if hardware.HIL_PSEUDO_QUEUE not in queues.consume_from:
        return
    facts = hardware.detect()
    profiles = hardware.matching(facts)
    queues.deselect([hardware.HIL_PSEUDO_QUEUE])
    for profile in profiles:
        queues.select_add(profile.queue)
    log.info("hardware targets of %s: %s (%s, %d cores, %d GPU(s))", sender,
             ", ".join(p.name for p in profiles) or "none matched", facts.cpu_model, facts.cores, len(facts.gpus))
    _hil_heartbeat = hardware.Heartbeat(sender, facts, profiles)
    _hil_heartbeat.start()


@worker_shutdown.connect
def _hil_withdraw(**kwargs: Any) -> None:
    if _hil_heartbeat is not None:
        _hil_heartbeat.stop()
