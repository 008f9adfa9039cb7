"""When the daemon syncs: the APScheduler trigger, and the nominal slot a run belongs to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

from sync.config import ScheduleSettings
from sync.errors import ConfigError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_INTERVAL_SECONDS = 30 * 60


_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_MICROSECOND = timedelta(microseconds=1)


class AlignedIntervalTrigger(BaseTrigger):
    """Fires on EPOCH + k x interval (UTC), whatever time the previous run had.

    APScheduler's IntervalTrigger adds the interval to the previous fire time, so after
    the start-up run (scheduled for "now", off the slots) every later run was off the
    slots too: started at :01.25 with 10 s, it fired at :11.25, :21.25, ...
    """

    __slots__ = ("step",)

    def __init__(self, seconds: float) -> None:
        # Integer microseconds, so that every replica computes the identical slots.
        self.step = round(seconds * 1_000_000)

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        """The first slot after the previous run's time, or at or after `now` without one."""
        if previous_fire_time is not None:
            # Strictly after: a run at exactly a slot was that slot's run.
            return self.slot_at_or_before(previous_fire_time) + timedelta(microseconds=self.step)
        elapsed = (now - EPOCH) // _MICROSECOND
        slots = -(-elapsed // self.step)  # rounded up: a slot at exactly `now` is due now
        return EPOCH + timedelta(microseconds=slots * self.step)

    def slot_at_or_before(self, when: datetime) -> datetime:
        """The latest slot at or before `when`, in UTC."""
        elapsed = (when - EPOCH) // _MICROSECOND
        return EPOCH + timedelta(microseconds=(elapsed // self.step) * self.step)

    def __str__(self) -> str:
        return f"every {timedelta(microseconds=self.step)}, aligned to the epoch (UTC)"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} (step={self.step}us)>"


def cron_trigger(expression: str, zone: ZoneInfo) -> CronTrigger:
    """A CronTrigger for a standard 5-field expression; ConfigError when it is not one.

    APScheduler 3 numbers weekdays from Monday = 0, standard cron from Sunday = 0 (7 is
    Sunday too): the day-of-week field is rewritten as day names so `1-5` means Mon-Fri.
    """
    fields = expression.split()
    if len(fields) != 5:
        raise ConfigError(
            f"schedule.cron {expression!r} is not a 5-field cron expression "
            "(minute hour day-of-month month day-of-week)"
        )
    try:
        fields[4] = _weekdays(fields[4])
        return CronTrigger.from_crontab(" ".join(fields), timezone=zone)
    except (ValueError, LookupError) as exc:
        raise ConfigError(f"schedule.cron {expression!r} is not valid: {exc}") from None


def _weekdays(field: str) -> str:
    if field in ("*", "?"):
        return "*"
    days: set[int] = set()
    for part in field.lower().split(","):
        spec, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if spec == "*":
            first, last = 0, 6
        else:
            start, _, end = spec.partition("-")
            first = _day_number(start)
            last = _day_number(end) if end else (6 if step_text else first)
        if last < first:
            last += 7
        days.update(day % 7 for day in range(first, last + 1, step))
    if not days:
        raise ValueError(f"no day in {field!r}")
    return ",".join(_DAY_NAMES[day] for day in sorted(days))


def _day_number(text: str) -> int:
    if text.isdigit():
        number = int(text)
        if not 0 <= number <= 7:
            raise ValueError(f"day of week {number} is not 0-7")
        return number % 7
    if text[:3] in _DAY_NAMES:
        return _DAY_NAMES.index(text[:3])
    raise ValueError(f"unknown day of week {text!r}")


class Schedule:
    """A cron expression or an epoch-aligned interval, so every replica computes the same slots."""

    def __init__(self, settings: ScheduleSettings) -> None:
        self.cron = settings.cron
        self.zone = ZoneInfo(settings.timezone)
        self.interval = None if self.cron else settings.interval_seconds or DEFAULT_INTERVAL_SECONDS
        if self.cron:
            cron_trigger(self.cron, self.zone)  # fail at start-up, not at the first slot

    def trigger(self) -> BaseTrigger:
        """The APScheduler trigger (no APScheduler jitter: it can fire before the slot)."""
        if self.cron:
            return cron_trigger(self.cron, self.zone)
        assert self.interval is not None
        return AlignedIntervalTrigger(self.interval)

    def slot_for(self, now: datetime) -> datetime:
        """The latest nominal fire time at or before `now`, in UTC."""
        if self.interval is not None:
            # The trigger's own arithmetic, so a run's slot is always one the trigger fires on.
            return AlignedIntervalTrigger(self.interval).slot_at_or_before(now)
        trigger = cron_trigger(self.cron or "", self.zone)
        window = timedelta(minutes=1)
        # Look back over a growing window until it holds a fire time, then walk it.
        while window < timedelta(days=800):
            fire = trigger.get_next_fire_time(None, now - window)
            if fire is not None and fire <= now:
                latest = fire
                while True:
                    following = trigger.get_next_fire_time(
                        latest, latest + timedelta(microseconds=1)
                    )
                    if following is None or following > now:
                        return latest.astimezone(UTC)
                    latest = following
            window *= 2
        raise ValueError(f"cron {self.cron!r} never fired in the last two years")

    def describe(self) -> str:
        """How the schedule reads in a log line."""
        if self.cron:
            return f"cron {self.cron!r} ({self.zone.key})"
        return f"every {self.interval:g}s, aligned to the epoch (UTC)"
